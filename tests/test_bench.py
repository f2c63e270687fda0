"""`python -m dd bench`: the JSON shape dashboards read, with minimal repetitions (no timing is asserted)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_bench_json_shape(tmp_path):
    out = tmp_path / "bench.json"
    cmd = [sys.executable, "-m", "dd", "bench", "--quick", "--json", str(out), "--markdown", str(tmp_path / "b.md"),
           "--repeats", "1", "--warmup", "0", "--pair-repeats", "1", "--throughput-batch", "4", "--pair-batch", "4",
           "--flow-tokens", "16", "--distill-batch", "4", "--no-real-codebooks"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads(out.read_text())

    families = {row["family"] for row in result["sampling"]}
    assert families == {"llamagen", "var"}
    for row in result["sampling"]:
        for key in ("config", "batch", "teacher_steps", "dd_steps", "teacher_s", "dd_s", "speedup"):
            assert key in row, key
        assert row["teacher_s"] > 0 and row["dd_s"] > 0 and row["speedup"] > 0
        assert row["dd_steps"] in (1, 2)
    steps = {r["family"]: r["teacher_steps"] for r in result["sampling"]}
    assert steps == {"llamagen": 64, "var": 6}          # the tiny teachers' real step counts
    assert {r["batch"] for r in result["sampling"]} == {1, 4}

    for row in result["pairgen_overhead"]:
        assert {"family", "V", "C", "ratio"} <= set(row) and row["ratio"] > 0
        assert row["timed_steps"] == row["teacher_steps"]          # the tiny rows time whole trajectories
        bd = row["breakdown"]
        assert bd["flow_map_s"] > 0 and bd["multinomial_s"] > 0 and row["breakdown_ratio"] > 0
    storage = result["pair_storage"]
    assert storage["bytes_per_token"] <= 2 and storage["header_bytes"] > 0
    assert storage["fp32_noise_bytes_per_token"] == 4 * storage["C"]
    assert [(r["V"], r["C"]) for r in result["flow_map"]] == [(16384, 8), (4096, 32)]
    assert all(r["tokens_per_s"] > 0 for r in result["flow_map"])
    assert result["distill_step_vs_teacher_step"] > 0
    assert "| family |" in (tmp_path / "b.md").read_text()


def test_bench_rejects_bad_sizes():
    r = subprocess.run([sys.executable, "-m", "dd", "bench", "--quick", "--repeats", "0"], capture_output=True,
                       text=True, timeout=120, cwd=REPO)
    assert r.returncode != 0 and "--repeats must be >= 1" in r.stderr
