import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from toy import ToyTeacher

from dd.method import pairs as P

SAMPLING = {"cfg_scale": 2.0, "top_k": 0, "top_p": 1.0, "temperature": 1.0}


def spec_for(t, count=12, chunk=4, shard=0, seed=0, teacher_id="toy"):
    V, C = t.codebook.shape
    return P.ShardSpec(teacher_id=teacher_id, n_tokens=t.n_tokens, codebook_dim=C, vocab_size=V,
                       num_classes=t.num_classes, shard=shard, count=count, base_seed=seed, chunk=chunk, nfe=10,
                       order=3, sampling=SAMPLING)


def test_regenerated_noise_equals_the_noise_used(tmp_path, monkeypatch):
    t = ToyTeacher()
    used = []
    real = P.flow_trajectory

    def spy(teacher, labels, noise, *a, **k):
        used.append((labels.clone(), noise.clone()))
        return real(teacher, labels, noise, *a, **k)

    monkeypatch.setattr(P, "flow_trajectory", spy)
    P.generate_shard(t, spec_for(t), tmp_path / "s.bin", progress=False)
    rec, m = P.open_shard(tmp_path / "s.bin")
    labels = torch.cat([u[0] for u in used])
    noise = torch.cat([u[1] for u in used])
    regen = P.pair_noise(rec["seed"], t.n_tokens, 4, t.num_classes)
    assert torch.equal(regen, noise)  # bit-exact
    assert torch.equal(torch.from_numpy(rec["label"].astype(np.int64)), labels)
    # and the stored tokens are the deterministic trajectory of that noise
    again = real(t, labels, regen, P.SamplingConfig(**SAMPLING))
    assert torch.equal(again, torch.from_numpy(rec["tokens"].astype(np.int64)))


def test_shards_are_disjoint_deterministic_and_compact(tmp_path):
    t = ToyTeacher()
    a = P.generate_shard(t, spec_for(t, shard=0), tmp_path / "a.bin", progress=False)
    P.generate_shard(t, spec_for(t, shard=1), tmp_path / "b.bin", progress=False)
    P.generate_shard(t, spec_for(t, shard=0), tmp_path / "a2.bin", progress=False)
    assert (tmp_path / "a.bin").read_bytes() == (tmp_path / "a2.bin").read_bytes()
    assert (tmp_path / "a.json").read_text() == (tmp_path / "a2.json").read_text()
    ra, _ = P.open_shard(tmp_path / "a.bin")
    rb, _ = P.open_shard(tmp_path / "b.bin")
    assert not set(ra["seed"].tolist()) & set(rb["seed"].tolist())
    # 12-byte header + 1 byte per token (V=16 fits uint8)
    assert a["record"]["bytes"] == 12 + t.n_tokens
    assert P.token_dtype(16384).itemsize == 2 and P.token_dtype(256).itemsize == 1
    for key in ("teacher_id", "config_hash", "seeds", "count", "format_version", "sha256"):
        assert key in a


def test_corrupt_truncated_and_mismatched_shards_are_reported(tmp_path):
    t = ToyTeacher()
    P.generate_shard(t, spec_for(t), tmp_path / "s.bin", progress=False)
    with pytest.raises(P.ShardError, match="teacher 'other'"):
        P.open_shard(tmp_path / "s.bin", teacher_id="other")
    data = bytearray((tmp_path / "s.bin").read_bytes())
    data[20] ^= 0xFF
    (tmp_path / "s.bin").write_bytes(bytes(data))
    with pytest.raises(P.ShardError, match=r"s\.bin: SHA-256 .* corrupt"):
        P.open_shard(tmp_path / "s.bin")
    (tmp_path / "s.bin").write_bytes(bytes(data[:-5]))
    with pytest.raises(P.ShardError, match="truncated"):
        P.open_shard(tmp_path / "s.bin")
    (tmp_path / "s.json").write_text("{not json")
    with pytest.raises(P.ShardError, match="corrupt shard manifest"):
        P.open_shard(tmp_path / "s.bin")


SLOW_WRITER = r"""
import sys, time, torch
sys.path.insert(0, {tests!r})
from toy import ToyTeacher
from dd.method import pairs as P
from test_pairs import spec_for
t = ToyTeacher()
real = P.flow_trajectory
def slow(*a, **k):
    time.sleep({delay})
    return real(*a, **k)
P.flow_trajectory = slow
m = P.generate_shard(t, spec_for(t, count=40, chunk=4), {out!r}, progress=False)
"""


def test_killed_shard_resumes_and_is_byte_identical(tmp_path):
    """SIGKILL a shard job mid-way, rerun it: same bytes as an uninterrupted run, no partial file
    under the final name, and only the uncommitted chunk is redone."""
    tests = str(Path(__file__).parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]), tests])}
    ref = tmp_path / "ref.bin"
    subprocess.run([sys.executable, "-c", SLOW_WRITER.format(tests=tests, delay=0.0, out=str(ref))], env=env, check=True)
    out = tmp_path / "s.bin"
    proc = subprocess.Popen([sys.executable, "-c", SLOW_WRITER.format(tests=tests, delay=0.15, out=str(out))], env=env)
    progress = Path(str(out) + ".part.json")
    deadline = time.time() + 60
    while time.time() < deadline:
        if progress.exists() and json.loads(progress.read_text() or "{}").get("committed", 0) >= 12:
            break
        time.sleep(0.05)
    time.sleep(0.07)  # land somewhere inside the next chunk
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists() and not P.manifest_path(out).exists()
    committed = json.loads(progress.read_text())["committed"]
    assert 12 <= committed < 40
    r = subprocess.run([sys.executable, "-c", SLOW_WRITER.format(tests=tests, delay=0.0, out=str(out))], env=env,
                       check=True, capture_output=True, text=True)
    assert f"resuming s.bin: {committed}/40 pairs already committed" in r.stdout
    print(f"killed after {committed}/40 committed pairs; redone: at most one chunk (4 pairs) in flight")
    assert out.read_bytes() == ref.read_bytes()
    assert P.manifest_path(out).read_text() == P.manifest_path(ref).read_text()
    assert not Path(str(out) + ".part").exists() and not progress.exists()


def test_flow_trajectory_of_the_first_steps_is_the_prefix_of_the_full_one():
    t = ToyTeacher()
    labels = torch.arange(6) % t.num_classes
    noise = P.pair_noise(np.arange(6), t.n_tokens, t.codebook.shape[1], t.num_classes)
    sampling = P.SamplingConfig(**SAMPLING)
    full = P.flow_trajectory(t, labels, noise, sampling)
    k = t.n_steps - 1
    head = P.flow_trajectory(t, labels, noise, sampling, n_steps=k)
    assert head.shape == (6, t.step_begin(k)) and torch.equal(head, full[:, : t.step_begin(k)])


def test_temporary_files_of_a_killed_atomic_write_are_removed_by_the_rerun(tmp_path):
    # a SIGKILL between creating and renaming the progress file's temporary file leaves it behind
    t = ToyTeacher()
    out = tmp_path / "s.bin"
    stale = [tmp_path / ".s.bin.part.json.ab12cd.tmp", tmp_path / ".s.json.x9.tmp"]
    for p in stale:
        p.write_text("{")
    other = tmp_path / ".t.bin.part.json.ab12cd.tmp"          # another shard's: not this job's to remove
    other.write_text("{")
    P.generate_shard(t, spec_for(t), out, progress=False)
    assert not any(p.exists() for p in stale) and other.exists()
    P.open_shard(out)
