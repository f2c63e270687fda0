"""``python -m dd verify-golden FILE...``: rebuild our models from golden files and compare outputs.

Each family recognises its golden files from their content (``Family.golden_kind``) and checks every recorded case
(``Family.verify_golden``); this module only dispatches and reports. The exit status is 1 when a case fails.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

from dd.families.registry import FAMILIES
from dd.golden.cases import CaseResult, load_golden


def verify_file(path: Path) -> tuple[str, list[CaseResult]]:
    blob = load_golden(path)
    for family in FAMILIES.values():
        kind = family.golden_kind(blob)
        if kind is not None:
            return kind, family.verify_golden(blob, path)
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
