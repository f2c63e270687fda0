"""DD machinery on randomly initialised tiny teachers of both real families (the embedded-default
architectures from config/tiny/*.yaml): pair faithfulness, distillation losses, artefact checks."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from dd.families import loading as families
from dd.method.distill import DistillConfig, build_lpips, distill_losses
from dd.method.pairs import flow_trajectory
from dd.method.teacher import SamplingConfig

FAMILIES = ["llamagen", "var"]


def tiny_teacher(family, seed=0, **tok_over):
    cfg = yaml.safe_load(open(f"config/tiny/{family}.yaml"))
    torch.manual_seed(seed)
    return families.build_tiny_teacher(cfg, **tok_over).eval().requires_grad_(False)


def _hist(tokens, V):
    return np.stack([np.bincount(tokens[:, j], minlength=V) / len(tokens) for j in range(tokens.shape[1])])


@pytest.mark.parametrize("family", FAMILIES)
def test_pair_tokens_are_a_faithful_sample_of_the_teacher(family):
    """Per-position token histograms of flow-mapped pairs vs ordinary multinomial teacher samples: the
    distance must be no larger than between two independent teacher sample sets (x1.3 + 0.02)."""
    t = tiny_teacher(family)
    V, C = t.codebook.shape
    n = 1500
    sampling = SamplingConfig(cfg_scale=2.0)
    labels = torch.arange(n) % t.num_classes
    g = torch.Generator().manual_seed(1)
    noise = torch.randn(n, t.n_tokens, C, generator=g)
    with torch.no_grad():
        pairs = flow_trajectory(t, labels, noise, sampling).numpy()
        a = t.sample(labels, sampling, torch.Generator().manual_seed(2)).numpy()
        b = t.sample(labels, sampling, torch.Generator().manual_seed(3)).numpy()
    tv = lambda x, y: 0.5 * np.abs(_hist(x, V) - _hist(y, V)).sum(1).mean()
    ours, baseline = tv(pairs, a), tv(b, a)
    print(f"{family}: mean per-position TV pairs-vs-teacher {ours:.4f}, teacher-vs-teacher {baseline:.4f}")
    assert ours <= 1.3 * baseline + 0.02


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("emb_loss", ["lpips", "mse"])
def test_distillation_losses_and_gradients(family, emb_loss):
    t = tiny_teacher(family)
    s = families.student_from_teacher(t)
    V, C = t.codebook.shape
    cfg = DistillConfig(timesteps=[1, 2], batch_size=4, emb_loss=emb_loss)
    tokens = torch.randint(V, (4, t.n_tokens))
    noise = torch.randn(4, t.n_tokens, C)
    losses = distill_losses(s, t, cfg, torch.tensor([0, 1, 2, 3]), tokens, noise, torch.tensor([0, 1, 0, 1]),
                            build_lpips(cfg, "cpu") if emb_loss == "lpips" else None)
    assert all(torch.isfinite(v) for v in losses.values()) and losses["emb"] > 0
    losses["loss"].backward()
    assert all(p.grad is not None for p in s.parameters() if p.requires_grad and p.grad is not None)
    assert sum(p.grad.abs().sum() for p in s.parameters() if p.grad is not None) > 0
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
