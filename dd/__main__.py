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
    "verify-golden": ("dd.golden.cli", "check our models against golden files recorded from the original code"),
    "download": ("dd.pipeline.download", "download released checkpoints (Hugging Face Hub, SHA-256 lock file)"),
    "random-weights": ("dd.pipeline.random_weights", "a released file's stand-in with random weights (rehearsals)"),
    "train-tokenizer": ("dd.pipeline.tiny_teachers", "train a tiny tokenizer on the bundled 8x8 digits"),
    "train-teacher": ("dd.pipeline.tiny_teachers", "train a tiny AR teacher on the bundled 8x8 digits"),
    "release-tiny": ("dd.pipeline.tiny_teachers", "write the tiny teachers and classifier as release files + lock"),
    "train-classifier": ("dd.evaluation.classifier", "train the digits classifier (embedded-default feature network)"),
    "generate-pairs": ("dd.method.pairs", "write one shard of (noise, data tokens, label) pairs"),
    "index-shards": ("dd.method.pairs", "check that pair shards form one pair set and write its index"),
    "train-t2i-teacher": ("dd.families.llamagen.tiny_t2i", "train the tiny text-to-image teacher on captioned digits"),
    "digit-prompts": ("dd.evaluation.digit_prompts", "captions of the digits from measured attributes (tiny text-to-image)"),
    "caption-features": ("dd.families.llamagen.text_encoder", "encode a prompt file once: text-to-image caption features"),
    "distill": ("dd.method.distill", "train a DD student on a pair set"),
    "sample": ("dd.method.sample", "sample images: DD few-step, teacher-involved, teacher and baselines"),
    "digits-reference": ("dd.evaluation.reference", "write the digits reference set (FID reference of the tiny teachers)"),
    "validate-features": ("dd.evaluation.validate_features", "does FID with a feature network rank what people see?"),
    "image-statistics": ("dd.evaluation.image_statistics", "FID statistics of a folder of real images (t2i reference)"),
    "check-inputs": ("dd.pipeline.user_inputs", "check the files a user gives a run (prompt files, image folders)"),
    "evaluate": ("dd.evaluation.metrics", "FID / IS / precision / recall of a sample set (torch-fidelity)"),
    "track": ("dd.pipeline.track", "log finished pipeline jobs to the MLflow store"),
    "report": ("dd.pipeline.report", "tables (paper Tables 1-2) and figures (Fig. 1/6/7) from the results"),
    "check-resources": ("dd.pipeline.resources", "check a configuration's declared job memory against a rehearsal's"),
    "clear-stale-locks": ("dd.pipeline.snakemake_locks", "remove Snakemake locks whose run was killed (pid gone)"),
    "bench": ("dd.bench", "benchmark DD against its teacher side by side"),
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
    from dd.evaluation.sample_sets import SampleSetError
    from dd.io import ArtefactError
    from dd.method.distill import DistillError
    from dd.method.pairs import ShardError, ShardSetError
    from dd.pipeline.config import ConfigError
    from dd.pipeline.download import DownloadError
    from dd.pipeline.prompt_files import PromptFileError
    from dd.pipeline.user_inputs import UserInputError

    return (ConfigError, DistillError, DownloadError, SampleSetError, ArtefactError, ShardError, ShardSetError,
            PromptFileError, UserInputError)


if __name__ == "__main__":
    sys.exit(main())
