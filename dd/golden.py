"""``python -m dd verify-golden FILE...``: rebuild our models from golden files and compare outputs.

A golden file (see ``../shared/golden/*/README.md``) is a dict with ``config``, ``state_dict``,
``inputs`` and ``outputs`` recorded from the original VAR / LlamaGen / DD code. Each family module
(``dd.golden_llamagen``, ``dd.golden_var``) recognises its files from their content and checks every
recorded case; this module only dispatches and reports.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import torch


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
    blob = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(blob, dict) or not {"config", "state_dict", "inputs", "outputs"} <= set(blob):
        raise ValueError(f"{path}: not a golden file (expected a dict with config, state_dict, inputs, outputs)")
    return blob


def float32_state_dict(sd: dict) -> dict:
    """Golden state dicts store floats as float16 (exactly); the models run in float32."""
    return {k: (v.float() if v.is_floating_point() else v) for k, v in sd.items()}


def verify_file(path: Path) -> tuple[str, list[CaseResult]]:
    from dd import golden_llamagen, golden_var

    blob = load_golden(path)
    for family in (golden_llamagen, golden_var):
        kind = family.detect(blob)
        if kind is not None:
            return kind, family.verify(blob, path)
    raise ValueError(f"{path}: unrecognised golden file (config keys: {sorted(blob['config'])[:12]})")


def add_arguments(parser):
    parser.add_argument("files", nargs="+", type=Path, help="golden .pt files")


def main(args) -> int:
    torch.set_num_threads(1)  # the references were recorded on one thread
    failed = 0
    for path in args.files:
        if not path.is_file():
            print(f"{path}: no such file", file=sys.stderr)
            failed += 1
            continue
        kind, results = verify_file(path)
        print(f"== {path} ({kind})")
        for r in results:
            print("  " + r.line())
        failed += sum(not r.ok for r in results)
    print(f"{'FAILED' if failed else 'passed'}: {failed} failing case(s)")
    return 1 if failed else 0
