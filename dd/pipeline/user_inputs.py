"""Files the user gives a run (prompt files, a folder of reference images, a local text-encoder snapshot), checked by
the first job of the experiment, before any download, encoding or sampling.

They are not checked when the configuration is read: a dry run (``snakemake -n``) of a paper configuration must show
its jobs on a machine that does not hold the user's data yet. The Snakefile lists the missing ones when it starts, and
the ``check_user_inputs`` job, on which the experiment's downloads and first stages depend, refuses a run with a clear
error naming the configuration key and the file (and for a prompt file its row) before anything expensive runs.

    python -m dd check-inputs --prompts experiments.x.prompts.train=data/laion.csv:caption \
        --images experiments.x.evaluation.reference_images=/data/coco/val2014 --encoder-dir KEY=DIR --out ok.json
"""
from __future__ import annotations

import argparse
from pathlib import Path

from dd.io import atomic_write_json


class UserInputError(ValueError):
    pass


def _key_value(text: str, flag: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key or not value:
        raise UserInputError(f"{flag} {text!r}: expected KEY=VALUE")
    return key, value


def check_prompt_file(key: str, path: str, column: str, tokenizer_dir: str | None = None) -> int:
    """Rows of a valid prompt file (``dd.pipeline.prompt_files``); prompts are counted in the tokens of the
    encoder's tokenizer when its snapshot is given, else in bytes (at least as many as any T5 tokenizer's)."""
    from dd.pipeline.prompt_files import PromptFileError, read_prompts

    count = None
    if tokenizer_dir is not None:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
        count = lambda s: len(tok(s)["input_ids"])  # noqa: E731
    try:
        rows = read_prompts(path, column, **({"count_tokens": count} if count else {}))
    except PromptFileError as e:
        raise UserInputError(f"{key}: {e}") from None
    return len(rows)


def check_image_folder(key: str, path: str) -> int:
    from dd.evaluation.image_statistics import image_files
    from dd.evaluation.sample_sets import SampleSetError

    try:
        return len(image_files(path))
    except SampleSetError as e:
        raise UserInputError(f"{key}: {e}") from None


def check_encoder_dir(key: str, path: str) -> None:
    p = Path(path)
    if not (p / "config.json").is_file():
        raise UserInputError(f"{key}: {path}: not a Hugging Face model snapshot (no config.json); download "
                             "google/flan-t5-xl there, e.g. huggingface-cli download google/flan-t5-xl --local-dir DIR")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--prompts", action="append", default=[], metavar="KEY=FILE:COLUMN",
                        help="a prompt file and its column of prompts (repeatable)")
    parser.add_argument("--images", action="append", default=[], metavar="KEY=DIR",
                        help="a folder of reference images (repeatable)")
    parser.add_argument("--encoder-dir", metavar="KEY=DIR", help="the text encoder's local snapshot (its tokenizer "
                        "counts the prompts' tokens)")
    parser.add_argument("--out", required=True, help="JSON summary, written only when every input passes")


def main(args: argparse.Namespace) -> int:
    summary: dict = {}
    tokenizer_dir = None
    if args.encoder_dir:
        key, path = _key_value(args.encoder_dir, "--encoder-dir")
        check_encoder_dir(key, path)
        summary[key], tokenizer_dir = path, path
    for item in args.prompts:
        key, value = _key_value(item, "--prompts")
        path, sep, column = value.rpartition(":")
        if not sep:
            raise UserInputError(f"--prompts {item!r}: expected KEY=FILE:COLUMN")
        summary[key] = {"file": path, "column": column, "rows": check_prompt_file(key, path, column, tokenizer_dir)}
    for item in args.images:
        key, path = _key_value(item, "--images")
        summary[key] = {"folder": path, "images": check_image_folder(key, path)}
    atomic_write_json(args.out, summary)
    print(f"{args.out}: {len(summary)} user inputs checked")
    return 0
