import numpy as np
import pytest
import torch
from toy import ToyStudent, ToyTeacher

from dd.method.sample import (
    dd_sample,
    dd_teacher_sample,
    onestep_star_sample,
    onestep_star_table,
    skip_sample,
    teacher_sample,
)
from dd.method.teacher import SamplingConfig


def test_onestep_star_on_the_papers_toy_set_gives_all_four_combinations_uniformly():
    """Sec. 3.1: pairs {(0,0), (1,1)} -> onestep* samples (0,0),(0,1),(1,0),(1,1) each with p = 1/4."""
    tokens = np.array([[0, 0], [1, 1]])
    table = onestep_star_table(np.zeros(2, dtype=int), tokens, num_classes=1)
    n = 40_000
    idx, passes = onestep_star_sample(table, torch.zeros(n, dtype=torch.long), torch.Generator().manual_seed(0))
    combos = (idx[:, 0] * 2 + idx[:, 1]).bincount(minlength=4).numpy()
    # chi-square goodness of fit against uniform, 3 dof: 16.27 is the 0.999 quantile
    chi2 = ((combos - n / 4) ** 2 / (n / 4)).sum()
    assert chi2 < 16.27, (combos, chi2)
    assert (combos > 0).all() and passes == 1


def test_onestep_star_draws_each_position_from_its_class_marginal():
    """Per class and position, onestep* token frequencies match the pair set's (chi-square, 3 classes x 3 positions),
    a class absent from the pairs falls back to all pairs, and no [classes, n, V] table is built (V = 16384 here)."""
    g = np.random.default_rng(0)
    labels = np.repeat([0, 2], [300, 200])                     # class 1 has no pairs
    tokens = np.stack([g.choice([5, 9], 500, p=[0.3, 0.7]), g.choice([1, 16383], 500, p=[0.5, 0.5]),
                       np.where(labels == 0, 7, 11)], 1)
    marginals = onestep_star_table(labels, tokens, num_classes=3)
    n = 20_000
    for c in range(3):
        idx, _ = onestep_star_sample(marginals, torch.full((n,), c), torch.Generator().manual_seed(c))
        rows = tokens if c == 1 else tokens[labels == c]
        for j in range(3):
            values, expected = np.unique(rows[:, j], return_counts=True)
            got = np.array([(idx[:, j].numpy() == v).sum() for v in values])
            assert got.sum() == n                                  # nothing outside the pairs' tokens
            expected = expected / expected.sum() * n
            chi2 = ((got - expected) ** 2 / expected).sum()
            assert chi2 < 13.8, (c, j, got, expected)              # 0.999 quantile, <= 2 dof
    assert marginals.tokens.numel() == tokens.size


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


def _reference_dd_step(student, teacher, x, noise, labels, step, split_step):
    """DD's sampling step as the original code does it: every output, Eq. 6 (final_predict), then the split."""
    from dd.method.student import final_predict, final_sequence, perturb
    B = x.shape[0]
    begin = torch.full((B,), teacher.step_begin(step - 1), dtype=torch.long)
    x_t = perturb(x, noise, begin)
    logits, emb = student(x_t, labels, torch.full((B,), step - 1, dtype=torch.long))
    tokens, fp = final_predict(logits, emb, x_t, begin, teacher.codebook)
    return final_sequence(tokens, fp, teacher.codebook, teacher.step_begin(split_step - 1))


@pytest.mark.parametrize("family", ["llamagen", "var"])
def test_dd_step_computes_only_the_outputs_it_uses_and_matches_the_full_computation(family):
    # dd_step asks the student for the logits before the split and the embeddings after it only
    # (rows=...); the sequence must equal the original full-output computation, for steps whose first
    # token is before, at and after the split, and for the split at the first and the last step
    from dd import bench
    from dd.families import loading as families
    from dd.method.sample import dd_step
    b = bench.tiny_teacher(family, seed=0)
    teacher = b.teacher.eval().requires_grad_(False)
    student = families.student_from_teacher(teacher).eval().requires_grad_(False)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in student.parameters():       # the logits head starts at zero: give every output a value
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    K, n, C = teacher.n_steps, teacher.n_tokens, teacher.codebook.shape[1]
    labels = torch.tensor([1, 4, 7])
    noise = torch.randn(3, n, C, generator=g)
    for split_step in sorted({1, 2, K // 2 + 1, K}):
        x = dd_step(student, teacher, noise, noise, labels, 1, split_step)
        torch.testing.assert_close(x, _reference_dd_step(student, teacher, noise, noise, labels, 1, split_step))
        for step in range(2, K + 1):
            got = dd_step(student, teacher, x, noise, labels, step, split_step)
            want = _reference_dd_step(student, teacher, x, noise, labels, step, split_step)
            torch.testing.assert_close(got, want, msg=f"step {step}, split step {split_step}")
            assert got.shape == (3, n, C)
        # the part before the split really is codebook rows
        from dd.method.student import nearest_code
        head = x[:, :teacher.step_begin(split_step - 1)]
        assert torch.equal(teacher.codebook[nearest_code(head, teacher.codebook)], head)


def test_rows_select_the_same_outputs_as_the_full_forward():
    from dd import bench
    from dd.families import loading as families
    for family in ("llamagen", "var"):
        teacher = bench.tiny_teacher(family, seed=1).teacher.eval()
        student = families.student_from_teacher(teacher).eval().requires_grad_(False)
        n, C = teacher.n_tokens, teacher.codebook.shape[1]
        x, labels, t = torch.randn(2, n, C), torch.tensor([0, 3]), torch.tensor([0, 2])
        with torch.no_grad():
            logits, emb = student(x, labels, t)
            part_logits, part_emb = student(x, labels, t, rows=(slice(2, 7), slice(7, n)))
        assert part_logits.shape == (2, 5, logits.shape[-1]) and part_emb.shape == (2, n - 7, C)
        torch.testing.assert_close(part_logits, logits[:, 2:7])
        torch.testing.assert_close(part_emb, emb[:, 7:])


def test_nearest_code_matmul_agrees_with_the_difference_form():
    from dd.method.student import nearest_code, nearest_code_matmul
    g = torch.Generator().manual_seed(5)
    book = torch.randn(300, 8, generator=g)
    x = torch.randn(4, 50, 8, generator=g)
    assert torch.equal(nearest_code_matmul(x, book), nearest_code(x, book))
    idx = torch.randint(0, 300, (4, 50), generator=g)
    assert torch.equal(nearest_code_matmul(book[idx], book), idx)


def test_inverse_cdf_draw_follows_the_probabilities_and_never_draws_a_zero():
    """The draw a CPU generator makes for probabilities on a GPU (dd sample on CUDA): 40,000 draws from a
    distribution with zeros; chi-square goodness of fit at the 0.1% level, and no zero-probability token drawn."""
    from scipy.stats import chisquare

    from dd.method.teacher import draw_tokens, inverse_cdf_draw

    g = torch.Generator().manual_seed(0)
    p = torch.rand(12, generator=g) ** 3
    p[[0, 5, 11]] = 0.0                        # the first and last tokens too: the cdf's ends
    p = (p / p.sum()).expand(40_000, -1)
    u = torch.rand(40_000, 1, generator=g, dtype=torch.float64)
    idx = inverse_cdf_draw(p, u).squeeze(1)
    counts = torch.bincount(idx, minlength=12)
    assert counts[[0, 5, 11]].sum() == 0
    nz = p[0] > 0
    expected = p[0][nz].double() / p[0][nz].double().sum() * counts.sum()
    assert chisquare(counts[nz].double().numpy(), expected.numpy()).pvalue > 1e-3
    # a generator on the probabilities' own device keeps torch.multinomial (the CPU sample sets are unchanged)
    a = draw_tokens(p[:100], torch.Generator().manual_seed(1))
    b = torch.multinomial(p[:100], 1, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
