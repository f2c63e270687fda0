"""DD machinery on randomly initialised tiny teachers of both real families (the embedded-default
architectures from config/tiny/*.yaml): pair faithfulness, distillation losses, artefact checks."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from dd.families import loading as families
from dd.method.distill import DistillConfig, build_lpips, distill_losses
from dd.method.pairs import flow_trajectory
from dd.method.sample import teacher_nll_bits
from dd.method.teacher import SamplingConfig

REPO = Path(__file__).resolve().parents[1]

FAMILIES = ["llamagen", "var"]


def tiny_teacher(family, seed=0, **tok_over):
    cfg = yaml.safe_load(open(f"config/tiny/{family}.yaml"))
    torch.manual_seed(seed)
    return families.build_tiny_teacher(cfg, **tok_over).eval().requires_grad_(False)


def shipped_teacher(family):
    """The shipped tiny teacher: trained, so its distribution is far from uniform and depends on the label and on
    the prefix (a random teacher's zero-initialised logits head would make every probability 1/V)."""
    release = REPO / "releases" / "tiny"
    spec = {"family": family, "tokenizer": release / f"tiny_{family}_tokenizer.safetensors",
            "model": release / f"tiny_{family}_ar.safetensors", "released": False}
    return families.load_teacher(spec)[0]


PAIR_SAMPLING = SamplingConfig(cfg_scale=2.0)


@pytest.fixture(scope="module", params=FAMILIES)
def pair_check(request):
    """Pairs (flow-mapped noise) and an ordinary multinomial teacher sample set, with the same labels, plus the
    pair sets a faulty generator would give: CFG 1 instead of 2, temperature 1.5, labels shuffled after generation,
    and each position's tokens shuffled among samples of the same label (what ignoring the prefix gives: the same
    per-position marginals, none of the dependence on earlier tokens)."""
    family = request.param
    t = shipped_teacher(family)
    C = t.codebook.shape[1]
    n = 400
    labels = torch.arange(n) % t.num_classes
    noise = torch.randn(n, t.n_tokens, C, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        pairs = flow_trajectory(t, labels, noise, PAIR_SAMPLING)
        teacher = t.sample(labels, PAIR_SAMPLING, torch.Generator().manual_seed(2))
        g = torch.Generator().manual_seed(3)
        no_prefix = pairs.clone()
        for c in range(t.num_classes):
            rows = torch.nonzero(labels == c).flatten()
            for j in range(t.n_tokens):
                no_prefix[rows, j] = pairs[rows[torch.randperm(len(rows), generator=g)], j]
        faulty = {
            "cfg 1": flow_trajectory(t, labels, noise, SamplingConfig(cfg_scale=1.0)),
            "temperature 1.5": flow_trajectory(t, labels, noise, SamplingConfig(cfg_scale=2.0, temperature=1.5)),
            "labels shuffled": pairs[torch.randperm(n, generator=g)],
            "prefix ignored": no_prefix,
        }
    return family, t, labels, pairs, teacher, faulty


def nll_gap(t, labels, x, y) -> tuple[float, float]:
    """Mean teacher NLL (bits/token, the pairs' own sampling settings) of token sets x and y with the same labels,
    and the standard error of their difference. A likelihood two-sample check: sensitive to everything the teacher's
    distribution depends on (label, prefix, CFG, temperature), unlike per-position token histograms."""
    a = teacher_nll_bits(t, x, labels, PAIR_SAMPLING)
    b = teacher_nll_bits(t, y, labels, PAIR_SAMPLING)
    se = (a.var() / len(a) + b.var() / len(b)).sqrt().item()
    return (a.mean() - b.mean()).item(), se


def test_pair_tokens_are_a_faithful_sample_of_the_teacher(pair_check):
    """Pairs and teacher samples have the same mean teacher NLL within 3 standard errors of the difference."""
    family, t, labels, pairs, teacher, _ = pair_check
    gap, se = nll_gap(t, labels, pairs, teacher)
    print(f"{family}: NLL pairs - teacher samples {gap:+.4f} bits/token (SE {se:.4f})")
    assert abs(gap) <= 3 * se


@pytest.mark.parametrize("fault", ["cfg 1", "temperature 1.5", "labels shuffled", "prefix ignored"])
def test_the_faithfulness_check_catches_faulty_pair_generation(pair_check, fault):
    """The same check on the pairs of a faulty generator fails, by a wide margin: the test above can fail."""
    family, t, labels, pairs, teacher, faulty = pair_check
    gap, se = nll_gap(t, labels, faulty[fault], teacher)
    print(f"{family} / {fault}: NLL gap {gap:+.4f} bits/token (SE {se:.4f})")
    assert abs(gap) > 6 * se


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("emb_loss", ["lpips", "mse"])
def test_distillation_losses_and_gradients(family, emb_loss):
    t = shipped_teacher(family)  # trained: a random tiny teacher's zero logits head would block gradients
    s = families.student_from_teacher(t)
    V, C = t.codebook.shape
    cfg = DistillConfig(timesteps=[1, 2], batch_size=4, emb_loss=emb_loss)
    tokens = torch.randint(V, (4, t.n_tokens))
    noise = torch.randn(4, t.n_tokens, C)
    losses = distill_losses(s, t, cfg, torch.tensor([0, 1, 2, 3]), tokens, noise, torch.tensor([0, 1, 0, 1]),
                            build_lpips(cfg, "cpu") if emb_loss == "lpips" else None)
    assert all(torch.isfinite(v) for v in losses.values()) and losses["emb"] > 0
    losses["loss"].backward()
    no_grad = [n for n, p in s.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())]
    assert not no_grad, f"parameters the losses do not reach: {no_grad}"
    assert all(p.grad is None for p in t.parameters())  # the teacher stays frozen


@pytest.mark.parametrize("family", FAMILIES)
def test_mismatched_artefacts_give_clear_errors(family, tmp_path):
    t = tiny_teacher(family)
    other = tiny_teacher(family, **({"codebook_size": 32} if family == "llamagen" else {"vocab_size": 32}))
    families.save_model(tmp_path / "tok.pt", family, "tokenizer", other.tokenizer)
    families.save_model(tmp_path / "ar.pt", family, "ar", t.ar)
    with pytest.raises(families.ArtefactError, match="tokenizer does not match the teacher"):
        families.load_teacher({"family": family, "tokenizer": tmp_path / "tok.pt", "model": tmp_path / "ar.pt"})
    with pytest.raises(families.ArtefactError, match="is a ar checkpoint, expected a tokenizer"):
        families.load_tokenizer(tmp_path / "ar.pt")
    (tmp_path / "bad.pt").write_bytes((tmp_path / "ar.pt").read_bytes()[:1000])
    with pytest.raises(families.ArtefactError, match=r"bad\.pt: cannot read checkpoint .*truncated or corrupt"):
        families.load_tokenizer(tmp_path / "bad.pt")
    # a student of the other family / architecture
    wrong = "var" if family == "llamagen" else "llamagen"
    torch.save({"family": wrong, "kind": "student", "student_config": {}, "ema": {}}, tmp_path / "student.pt")
    with pytest.raises(families.ArtefactError, match=f"a '{wrong}' student cannot be used with a '{family}' teacher"):
        families.load_student(tmp_path / "student.pt", t)
    s = families.student_from_teacher(other)
    torch.save({"family": family, "kind": "student", "student_config": families.model_config(s),
                "ema": s.state_dict()},
               tmp_path / "student2.pt")
    with pytest.raises(families.ArtefactError, match="student predicts"):
        families.load_student(tmp_path / "student2.pt", t)
    # through the command line: exit 2 and one line naming the file, no traceback
    r = subprocess.run([sys.executable, "-m", "dd", "sample", "--family", family, "--tokenizer", str(tmp_path / "tok.pt"),
                        "--model", str(tmp_path / "ar.pt"), "--method", "teacher", "--num", "2",
                        "--out", str(tmp_path / "s.npz")], capture_output=True, text=True, timeout=300,
                       cwd=Path(__file__).resolve().parents[1])
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr and "error:" in r.stderr and "does not match" in r.stderr, r.stderr
    assert not (tmp_path / "s.npz").exists()
