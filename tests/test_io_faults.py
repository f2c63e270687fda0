"""Disk faults and memory: a failed write never damages what was there, shards stream in bounded memory."""
import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_pairs import spec_for
from toy import ToyTeacher

from dd import io as dio
from dd.method import pairs as P


def test_disk_full_during_an_atomic_write_keeps_the_previous_file(tmp_path, monkeypatch):
    target = tmp_path / "metrics.json"
    dio.atomic_write_json(target, {"fid": 1.0})

    def no_space(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(OSError, match="No space left"):
        dio.atomic_write_json(target, {"fid": 2.0})
    assert json.loads(target.read_text()) == {"fid": 1.0}
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]  # no temporary left behind


def test_disk_full_during_a_shard_keeps_committed_chunks_and_resumes(tmp_path, monkeypatch):
    t = ToyTeacher()
    ref = tmp_path / "ref.bin"
    P.generate_shard(t, spec_for(t, count=20, chunk=4), ref, progress=False)
    out = tmp_path / "s.bin"
    real_write_json, calls = P.atomic_write_json, []

    def flaky(path, obj):
        calls.append(obj)
        if len(calls) == 3:  # the third chunk's commit hits a full disk
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write_json(path, obj)

    monkeypatch.setattr(P, "atomic_write_json", flaky)
    with pytest.raises(OSError):
        P.generate_shard(t, spec_for(t, count=20, chunk=4), out, progress=False)
    monkeypatch.setattr(P, "atomic_write_json", real_write_json)
    assert not out.exists()
    assert json.loads(Path(str(out) + ".part.json").read_text())["committed"] == 8
    P.generate_shard(t, spec_for(t, count=20, chunk=4), out, progress=False)
    assert out.read_bytes() == ref.read_bytes()


RSS_SCRIPT = r"""
import sys
sys.path.insert(0, {tests!r})
from toy import ToyTeacher
from dd.method import pairs as P
from test_pairs import spec_for
import torch
t = ToyTeacher(step_sizes=(1024,), vocab=300, dim=8)  # 2 KiB of tokens per pair
# the writer's memory is under test, not the flow map: a cheap deterministic stand-in for the trajectory
P.flow_trajectory = lambda teacher, labels, noise, *a: (noise[..., 0].abs() * 100).long() % 300
P.generate_shard(t, spec_for(t, count={count}, chunk=64), {out!r}, progress=False)
# VmHWM, this process image's own peak: ru_maxrss would also count the forking pytest process's RSS,
# which Linux carries across exec
print([int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM')][0])
"""


def test_shard_memory_does_not_grow_with_shard_size(tmp_path):
    tests = str(Path(__file__).parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]), tests])}
    rss = {}
    for count in (2048, 16384):
        r = subprocess.run([sys.executable, "-c", RSS_SCRIPT.format(tests=tests, count=count,
                                                                     out=str(tmp_path / f"{count}.bin"))],
                           env=env, check=True, capture_output=True, text=True)
        rss[count] = int(r.stdout.split()[-1]) / 1024
    size = {c: (tmp_path / f"{c}.bin").stat().st_size / 2**20 for c in rss}
    print(f"peak RSS: {size[2048]:.0f} MiB shard {rss[2048]:.1f} MiB, {size[16384]:.0f} MiB shard {rss[16384]:.1f} MiB")
    # 8x the pairs (+28 MiB on disk) must not cost more than a few MiB of extra peak memory
    assert rss[16384] - rss[2048] < 8, rss
