"""Evaluation settings as a small dataclass: the defaults of ``python -m dd evaluate`` and of the pipeline
config's ``evaluation`` section (no heavy imports: the Snakefile reads it while parsing the config)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EvaluationSettings:
    splits: int = 1                 # parts of a sample set, each evaluated alone: the metrics' standard errors
    batch_size: int = 250           # feature-extraction batch
    seed: int = 2020                # torch-fidelity's rng_seed (IS shuffling, KID subsets)
    isc_splits: int = 10            # IS splits
    kid_subsets: int = 100          # KID subsets
    kid_subset_size: int = 1000     # at most; never more than half the smaller set
    prc_neighborhood: int = 3       # precision / recall k-NN
