"""Command line: ``python -m dd SUBCOMMAND``.

Each subcommand lives in its own module, which defines ``add_arguments(parser)`` and
``main(args) -> int``. Modules are imported only when their subcommand runs, so ``--help`` is fast.
"""
from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "verify-golden": ("dd.golden", "check our models against golden files recorded from the original code"),
    "download": ("dd.download", "download released checkpoints (resume, retries, SHA-256 lock file)"),
    "train-tokenizer": ("dd.train", "train a tiny tokenizer on the bundled 8x8 digits"),
    "train-teacher": ("dd.train", "train a tiny AR teacher on the bundled 8x8 digits"),
    "train-classifier": ("dd.classifier", "train the digits classifier (embedded-default feature network)"),
    "generate-pairs": ("dd.pairs", "write one shard of (noise, data tokens, label) pairs"),
    "distill": ("dd.distill", "train a DD student on pair shards"),
    "sample": ("dd.sample", "sample images: DD few-step, teacher-involved, teacher and baselines"),
    "evaluate": ("dd.evaluate", "FID / IS / precision / recall of a sample set (torch-fidelity)"),
    "bench": ("dd.bench", "benchmark DD against its teacher side by side"),
    "digits-reference": ("dd.pipeline", "write the digits reference set (FID reference of the tiny teachers)"),
    "index-shards": ("dd.pipeline", "check that pair shards form one pair set and write its index"),
    "track": ("dd.track", "log finished pipeline jobs to the MLflow store"),
    "report": ("dd.report", "tables (paper Tables 1-2) and figures (Fig. 1/6/7) from the results"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m dd", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="SUBCOMMAND")
    for name, (module, help_) in COMMANDS.items():
        sub.add_parser(name, help=help_, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        build_parser().print_help()
        return 0
    name = argv[0]
    if name not in COMMANDS:
        build_parser().print_usage(sys.stderr)
        print(f"python -m dd: unknown subcommand {name!r}; choose from {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    module_name, help_ = COMMANDS[name]
    module = importlib.import_module(module_name)
    parser = argparse.ArgumentParser(prog=f"python -m dd {name}", description=help_)
    if hasattr(module, "add_arguments_for"):
        module.add_arguments_for(name, parser)
    else:
        module.add_arguments(parser)
    args = parser.parse_args(argv[1:])
    args.command = name
    try:
        return int(module.main(args) or 0)
    except Exception as e:
        if isinstance(e, _user_errors()):
            # bad input, mismatched or corrupt artefacts, numerical faults: the message says what and where
            print(f"python -m dd {name}: error: {e}", file=sys.stderr)
            return 2
        raise


def _user_errors() -> tuple[type, ...]:
    """The errors that describe a problem with the user's input rather than a bug (imported only when needed)."""
    from dd.config import ConfigError
    from dd.distill import DistillError
    from dd.download import DownloadError
    from dd.evaluate import SampleSetError
    from dd.families import ArtefactError
    from dd.pairs import ShardError
    from dd.pipeline import ShardSetError

    return (ConfigError, DistillError, DownloadError, SampleSetError, ArtefactError, ShardError, ShardSetError)


if __name__ == "__main__":
    sys.exit(main())
