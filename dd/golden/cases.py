"""Comparing our outputs with the reference tensors of a golden file (``../shared/golden/*/README.md``).

A golden file is a dict with ``config``, ``state_dict``, ``inputs`` and ``outputs`` recorded from the original
VAR / LlamaGen / DD code. Each family's ``golden`` module rebuilds its models from such a file and reports one
``CaseResult`` per recorded output, with the helpers here.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from dd.io import read_checkpoint


@dataclass
class CaseResult:
    name: str
    max_abs_err: float        # for exact (integer / mask / -inf pattern) cases: number of mismatches
    tol: float
    exact: bool = False

    @property
    def ok(self) -> bool:
        return self.max_abs_err == 0 if self.exact else self.max_abs_err <= self.tol

    def line(self) -> str:
        status = "ok  " if self.ok else "FAIL"
        if self.exact:
            return f"{status} {self.name}: {int(self.max_abs_err)} mismatches (exact match required)"
        return f"{status} {self.name}: max abs err {self.max_abs_err:.3g} (tol {self.tol:.0e})"


def float_case(name: str, ours: torch.Tensor, ref: torch.Tensor, tol: float = 1e-4) -> CaseResult:
    """Max abs error between float tensors; -inf positions must coincide exactly."""
    ours, ref = ours.detach().float().cpu(), ref.detach().float().cpu()
    if ours.shape != ref.shape:
        raise ValueError(f"{name}: shape {tuple(ours.shape)} != reference {tuple(ref.shape)}")
    inf_ours, inf_ref = torch.isinf(ours), torch.isinf(ref)
    if not torch.equal(inf_ours, inf_ref) or not torch.equal(ours[inf_ours], ref[inf_ref]):
        return CaseResult(name + " (inf pattern)", float((inf_ours != inf_ref).sum()), 0, exact=True)
    finite = ~inf_ref
    err = (ours[finite] - ref[finite]).abs().max().item() if finite.any() else 0.0
    return CaseResult(name, err, tol)


def exact_case(name: str, ours: torch.Tensor, ref: torch.Tensor) -> CaseResult:
    ours, ref = ours.detach().cpu(), ref.detach().cpu()
    if ours.shape != ref.shape:
        raise ValueError(f"{name}: shape {tuple(ours.shape)} != reference {tuple(ref.shape)}")
    return CaseResult(name, float((ours.long() != ref.long()).sum()), 0, exact=True)


def load_golden(path: Path) -> dict:
    blob = read_checkpoint(path)
    if not isinstance(blob, dict) or not {"config", "state_dict", "inputs", "outputs"} <= set(blob):
        raise ValueError(f"{path}: not a golden file (expected a dict with config, state_dict, inputs, outputs)")
    return blob


def float32_state_dict(sd: dict) -> dict:
    """Golden state dicts store floats as float16 (exactly); the models run in float32."""
    return {k: (v.float() if v.is_floating_point() else v) for k, v in sd.items()}


