import numpy as np
import pytest
import torch

from dd.sample import (dd_sample, dd_teacher_sample, onestep_star_sample, onestep_star_table, skip_sample,
                       teacher_sample)
from dd.teacher import SamplingConfig
from toy import ToyStudent, ToyTeacher


def test_onestep_star_on_the_papers_toy_set_gives_all_four_combinations_uniformly():
    """Sec. 3.1: pairs {(0,0), (1,1)} -> onestep* samples (0,0),(0,1),(1,0),(1,1) each with p = 1/4."""
    tokens = np.array([[0, 0], [1, 1]])
    table = onestep_star_table(np.zeros(2, dtype=int), tokens, num_classes=1, vocab_size=2)
    n = 40_000
    idx, passes = onestep_star_sample(table, torch.zeros(n, dtype=torch.long), torch.Generator().manual_seed(0))
    combos = (idx[:, 0] * 2 + idx[:, 1]).bincount(minlength=4).numpy()
    # chi-square goodness of fit against uniform, 3 dof: 16.27 is the 0.999 quantile
    chi2 = ((combos - n / 4) ** 2 / (n / 4)).sum()
    assert chi2 < 16.27, (combos, chi2)
    assert (combos > 0).all() and passes == 1


def test_teacher_involved_sampling_counts_passes_and_keeps_the_prefix():
    t, labels = ToyTeacher(step_sizes=(1, 1, 1, 1, 1)), torch.tensor([0, 1])
    s = ToyStudent(t)
    noise = torch.randn(2, t.n_tokens, 4, generator=torch.Generator().manual_seed(0))
    one, p1 = dd_sample(s, t, labels, noise, [1], split_step=3)
    t.forward_calls = 0
    x, passes = dd_teacher_sample(s, t, labels, noise, start=2, second=4, split_step=3, sampling=SamplingConfig())
    assert passes == 1 + 2 + 1 and t.forward_calls == 2  # DD, teacher steps 2 and 3, DD
    # the first token is the DD first step's output (snapped), untouched by the teacher
    assert torch.allclose(x[:, 0], one[:, 0])
    _, passes = dd_teacher_sample(s, t, labels, noise, start=1, second=4, split_step=3, sampling=SamplingConfig())
    assert passes == 3 + 1
    with pytest.raises(ValueError):
        dd_teacher_sample(s, t, labels, noise, start=4, second=4, split_step=3, sampling=SamplingConfig())


def test_dd_multistep_keeps_earlier_steps_and_reuses_the_initial_noise():
    t, labels = ToyTeacher(), torch.tensor([0, 2])
    s = ToyStudent(t)
    noise = torch.randn(2, t.n_tokens, 4)
    one, _ = dd_sample(s, t, labels, noise, [1], split_step=1)
    two, n = dd_sample(s, t, labels, noise, [1, 2], split_step=1)
    assert n == 2 and torch.equal(two[:, :1], one[:, :1])
    with pytest.raises(ValueError, match="start at step 1"):
        dd_sample(s, t, labels, noise, [2], split_step=1)


def test_teacher_and_skip_baselines_step_counts():
    t, labels = ToyTeacher(step_sizes=(1, 2, 3)), torch.tensor([0, 1])
    emb, n = teacher_sample(t, labels, SamplingConfig(cfg_scale=2.0))
    assert emb.shape == (2, 6, 4) and n == 3
    emb, n = skip_sample(t, labels, 1, SamplingConfig())
    assert emb.shape == (2, 3, 4) and n == 2
    assert t.decode_prefix(emb).shape == t.decode_embeddings(torch.zeros(2, 6, 4)).shape
