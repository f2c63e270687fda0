"""Prompt files of the text-to-image experiments, checked before any caption is encoded.

A prompt file is a CSV or TSV (by its suffix: ``.tsv`` is tab-separated, unquoted) with a header row; the configuration names
the column that holds the prompts (LAION-COCO's ``caption``, COCO's ``caption``, the digits' ``prompt``) and any
further columns it needs. Every row must hold a non-empty prompt that fits the caption length the text encoder is
given (LlamaGen's t2i model: 120 tokens, the end-of-sequence token included). A file that breaks any of this is
refused with its path, its row (the header is row 1, as a spreadsheet shows it) and what was expected, before a
model is loaded.
"""
from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Callable

CAPTION_TOKENS = 120


class PromptFileError(ValueError):
    pass


def byte_tokens(text: str) -> int:
    """Tokens of a byte-level T5 tokenizer (ByT5: one per UTF-8 byte, plus the end-of-sequence token)."""
    return len(text.encode("utf-8")) + 1


def _decode(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        row = data[:e.start].count(b"\n") + 1
        raise PromptFileError(f"{path}: row {row}: not UTF-8 (byte 0x{data[e.start]:02x} at offset {e.start}); "
                              f"save the file as UTF-8") from None


def read_prompts(path: str | Path, column: str, extra_columns: tuple[str, ...] = (),
                 count_tokens: Callable[[str], int] = byte_tokens, max_tokens: int = CAPTION_TOKENS) -> list[dict]:
    """Rows ``{column: prompt, extra: value, ...}`` of a prompt file, in file order; raises ``PromptFileError``."""
    path = Path(path)
    if not path.is_file():
        raise PromptFileError(f"{path}: prompt file not found")
    text = _decode(path)
    tsv = path.suffix == ".tsv"        # TSV has no quoting: a quote in a prompt is part of it
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter="\t" if tsv else ",",
                            quoting=csv.QUOTE_NONE if tsv else csv.QUOTE_MINIMAL)
    header = reader.fieldnames or []
    missing = [c for c in (column, *extra_columns) if c not in header]
    if missing:
        raise PromptFileError(f"{path}: no column {', '.join(map(repr, missing))} in the header "
                              f"(it has {', '.join(map(repr, header)) or 'nothing'})")
    rows = []
    for row in reader:
        i = reader.line_num                  # the file's line (a blank line is skipped, not miscounted)
        prompt = (row[column] or "").strip()
        if not prompt:
            raise PromptFileError(f"{path}: row {i}: empty prompt in column {column!r}")
        n = count_tokens(prompt)
        if n > max_tokens:
            raise PromptFileError(f"{path}: row {i}: the prompt is {n} tokens, longer than the {max_tokens} the text "
                                  f"encoder is given: {prompt[:60]!r}...")
        rows.append({column: prompt, **{c: row[c] for c in extra_columns}})
    if not rows:
        raise PromptFileError(f"{path}: no prompts (only a header)")
    return rows
