"""``python -m dd report``: the paper's tables and figures from an experiment's sample sets and metrics.

    python -m dd report tables --dir results/E --teacher var-tiny --sets teacher skip-1 ... [--table2-sets ...]
    python -m dd report fig1 --tables results/E/tables/table1.csv results/E/tables/table2.csv --out fig1.png
    python -m dd report curves LABEL=results/E/distill/main/metrics.jsonl ... --out fig6.png

``tables`` reads, for every sample set S, ``DIR/samples/S.json`` (written by ``dd sample``: method, steps =
network passes per image, seconds_per_image, batch_size, params), ``DIR/metrics/S.json`` (``dd evaluate`` against
the data; its ``vs_teacher`` part, when present, against the teacher's own samples), and writes
``DIR/tables/table1.{csv,md}`` (teacher, skip-n, onestep*, DD 1/2-step: paper Table 1) and
``DIR/tables/table2.{csv,md}`` (teacher and the teacher-involved pre-trained-n-m sets: paper Table 2).

Column names are an interface (other tools read the tables): ``teacher, method, steps, fid, is, precision,
recall, teacher_nll_bits, seconds_per_image, speedup``, each metric followed by its standard error ``<metric>_std``
(over the evaluation's parts: equal, independently sampled parts of the sample set, ``evaluation.splits``; empty
with one part), then ``kid, fid_vs_teacher (+ _std), classifier_accuracy, params, batch_size, num, set``.
Text-to-image tables add ``prompt_accuracy, prompt_accuracy_std`` after ``classifier_accuracy`` (the share of samples
whose digit and measured attributes match their prompt; standard error over samples, ``dd evaluate --prompts``),
and ``clip_score, clip_score_std`` after those when the evaluation computes CLIP score (``evaluation.clip_model``).
``teacher_nll_bits`` is the teacher's mean negative log2-likelihood per token of the set's token sequences under
its own sampling distribution (``dd.method.sample.teacher_nll_bits``; empty for skip-n, whose images lack tokens). ``method`` is ``teacher``, ``skip-<n>``, ``onestep*``, ``dd`` (``steps`` says 1 or 2) or
``dd-teacher-<n>-<m>`` (the paper's pre-trained-n-m); ``speedup`` = the teacher's seconds per image / the row's.
"""
from __future__ import annotations

import argparse
import io
import json
import math
import re
import sys
from collections import Counter
from pathlib import Path

import pandas as pd

from dd.io import atomic_write_bytes, atomic_write_text

COLUMNS = ["teacher", "method", "steps", "fid", "fid_std", "is", "is_std", "precision", "precision_std", "recall",
           "recall_std", "teacher_nll_bits", "teacher_nll_bits_std", "seconds_per_image", "speedup",
           "kid", "fid_vs_teacher", "fid_vs_teacher_std", "classifier_accuracy", "params", "batch_size", "num", "set"]
PROMPT_COLUMNS = ["prompt_accuracy", "prompt_accuracy_std"]    # text-to-image tables only: the digits
CLIP_COLUMNS = ["clip_score", "clip_score_std"]                 # text-to-image tables with evaluation.clip_model
FID_KEYS = ("eval/fid_1step", "eval/fid_2step")


# ---------------------------------------------------------------------------------------------------------------
# tables
# ---------------------------------------------------------------------------------------------------------------


def method_of(set_name: str) -> str:
    """The table's method label of a sample set name (see the module docstring)."""
    if set_name == "onestep":
        return "onestep*"
    if re.fullmatch(r"dd-\d+step", set_name):
        return "dd"
    return set_name  # teacher, skip-<n>, dd-teacher-<n>-<m>


def _sort_key(row: dict) -> tuple:
    method = row["method"]
    order = {"teacher": 0, "skip": 1, "onestep*": 2, "dd": 3, "dd-teacher": 4}
    kind = "dd-teacher" if method.startswith("dd-teacher") else "skip" if method.startswith("skip-") else method
    numbers = tuple(int(n) for n in re.findall(r"\d+", method))
    return order.get(kind, 9), numbers, row.get("steps") or 0


def _read(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: not found (run the pipeline's sample/evaluate jobs first)") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


def collect_rows(result_dir: str | Path, sets: list[str], teacher: str) -> pd.DataFrame:
    """One row per sample set with every column of ``COLUMNS``."""
    result_dir = Path(result_dir)
    rows = []
    for name in sets:
        info = _read(result_dir / "samples" / f"{name}.json")
        metrics = _read(result_dir / "metrics" / f"{name}.json")
        vs = metrics.get("vs_teacher") or {}          # FID against the teacher's own samples (same job)
        rows.append({
            "teacher": teacher, "method": method_of(name), "steps": info.get("steps"),
            "fid": metrics.get("fid"), "fid_std": metrics.get("fid_std"),
            "is": metrics.get("isc_mean"), "is_std": metrics.get("isc_mean_std"),
            "precision": metrics.get("precision"), "precision_std": metrics.get("precision_std"),
            "recall": metrics.get("recall"), "recall_std": metrics.get("recall_std"),
            "teacher_nll_bits": metrics.get("teacher_nll_bits"),
            "teacher_nll_bits_std": metrics.get("teacher_nll_bits_std"),
            "seconds_per_image": info.get("seconds_per_image"), "speedup": None,
            "kid": metrics.get("kid_mean"), "fid_vs_teacher": vs.get("fid"), "fid_vs_teacher_std": vs.get("fid_std"),
            "classifier_accuracy": metrics.get("classifier_accuracy"), "params": info.get("params"),
            "batch_size": info.get("batch_size"), "num": info.get("num", metrics.get("num_samples")), "set": name,
            "prompt_accuracy": metrics.get("prompt_accuracy"), "prompt_accuracy_std": metrics.get("prompt_accuracy_std"),
            "clip_score": metrics.get("clip_score"), "clip_score_std": metrics.get("clip_score_std"),
        })
    teacher_rows = [r for r in rows if r["method"] == "teacher"]
    base = teacher_rows[0]["seconds_per_image"] if teacher_rows else None
    for r in rows:
        spi = r["seconds_per_image"]
        r["speedup"] = base / spi if base and spi else None
    rows.sort(key=_sort_key)
    # text-to-image sets (evaluated against their prompts) add prompt_accuracy after classifier_accuracy
    columns = list(COLUMNS)
    at = columns.index("classifier_accuracy") + 1
    for key, extra in (("clip_score", CLIP_COLUMNS), ("prompt_accuracy", PROMPT_COLUMNS)):
        if any(r[key] is not None for r in rows):
            columns[at:at] = extra
    return pd.DataFrame(rows, columns=columns)


def split_tables(rows: pd.DataFrame, table2_sets: list[str] | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(table1, table2): Table 1 = teacher, skip-n, onestep*, dd; Table 2 = teacher + teacher-involved sets."""
    is_teacher = rows["method"] == "teacher"
    involved = rows["method"].str.startswith("dd-teacher-")
    if table2_sets is not None:
        involved = rows["set"].isin(table2_sets) & ~is_teacher
    table1 = rows[~involved].reset_index(drop=True)
    table2 = rows[is_teacher | involved].reset_index(drop=True)
    return table1, table2


def to_markdown(df: pd.DataFrame, title: str = "") -> str:
    """A GitHub Markdown table (no dependency beyond pandas)."""

    def fmt(v) -> str:
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return "-"
        if isinstance(v, float):
            return f"{v:.4g}" if abs(v) >= 1e-3 or v == 0 else f"{v:.3e}"
        return str(v)

    lines = [f"**{title}**", ""] if title else []
    lines.append("| " + " | ".join(df.columns) + " |")
    lines.append("|" + "|".join("---" for _ in df.columns) + "|")
    for row in df.itertuples(index=False):
        lines.append("| " + " | ".join(fmt(v) for v in row) + " |")
    return "\n".join(lines) + "\n"


def write_tables(result_dir: str | Path, sets: list[str], teacher: str, table2_sets: list[str] | None = None,
                 out_dir: str | Path | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    out_dir = Path(out_dir or Path(result_dir) / "tables")
    rows = collect_rows(result_dir, sets, teacher)
    table1, table2 = split_tables(rows, table2_sets)
    for name, table, title in (("table1", table1, "Table 1: few-step generation vs baselines"),
                               ("table2", table2, "Table 2: sampling with the teacher involved")):
        atomic_write_text(out_dir / f"{name}.csv", table.to_csv(index=False))
        atomic_write_text(out_dir / f"{name}.md", to_markdown(table, f"{title} ({teacher})"))
    return table1, table2


# ---------------------------------------------------------------------------------------------------------------
# figures
# ---------------------------------------------------------------------------------------------------------------


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, out) -> None:
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    atomic_write_bytes(out, buf.getvalue())


def label_of(row) -> str:
    method = row["method"]
    return f"dd {int(row['steps'])}-step" if method == "dd" else method


def fig_fid_vs_time(tables: list[str | Path], out: str | Path, title: str = "") -> None:
    """Paper Fig. 1: FID against seconds per image, one point per sample set, with error bars of +-2 standard
    errors (``fid_std``). Each set is named in the legend with its FID and standard error: at this size several sets
    share a spot of the plot, and labels written beside the points would cover each other."""
    plt = _pyplot()
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    df = pd.concat([pd.read_csv(t) for t in tables]).drop_duplicates(subset=["set"])
    df = df.dropna(subset=["fid", "seconds_per_image"])
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    styles = {"teacher": ("k", "*"), "skip": ("tab:gray", "s"), "onestep*": ("tab:red", "x"), "dd": ("tab:blue", "o"),
              "dd-teacher": ("tab:green", "^")}
    shades = Counter()   # sets of one kind get lighter shades of its colour, so each point can be told apart
    for _, row in df.iterrows():
        m = row["method"]
        kind = "dd-teacher" if m.startswith("dd-teacher") else "skip" if m.startswith("skip-") else m
        color, marker = styles.get(kind, ("tab:purple", "d"))
        alpha = max(0.35, 1.0 - 0.25 * shades[kind])
        shades[kind] += 1
        std = row["fid_std"] if "fid_std" in row and pd.notna(row["fid_std"]) else None
        label = f"{label_of(row)}: {row['fid']:.1f}" + (f" +- {std:.1f}" if std is not None else "")
        ax.errorbar(row["seconds_per_image"], row["fid"], yerr=None if std is None else 2 * std, c=color,
                    marker=marker, ms=8, alpha=alpha, capsize=4, lw=1.2, ls="none", label=label)
    plain = FuncFormatter(lambda v, _: f"{v:g}")
    ax.set_xscale("log")
    ax.xaxis.set_minor_formatter(NullFormatter())   # the log axis's minor labels run into each other
    if len(df) and df["fid"].max() / max(df["fid"].min(), 1e-9) > 5:
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 3.0, 5.0)))
        ax.yaxis.set_major_formatter(plain)
        ax.yaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("seconds per image (steady state)")
    ax.set_ylabel("FID (lower is better)")
    ax.set_title(f"FID vs generation time{': ' + title if title else ''}")
    ax.grid(True, which="both", alpha=0.3)
    if len(df):
        ax.legend(title="set: FID +- SE (bars: +-2 SE)", fontsize=7, title_fontsize=7, loc="upper left",
                  bbox_to_anchor=(1.01, 1.0), frameon=False)
    _save(fig, out)
    plt.close(fig)


def read_curve(path: str | Path) -> pd.DataFrame:
    """Periodic-FID rows (step, eval/fid_1step, eval/fid_2step) of a distill metrics JSONL."""
    rows = []
    for line in Path(path).read_text().splitlines():
        if not line.strip():
            continue
        row = json.loads(line)
        if "step" in row and any(k in row for k in FID_KEYS):
            rows.append({"step": row["step"], **{k: row.get(k) for k in FID_KEYS}})
    return pd.DataFrame(rows, columns=["step", *FID_KEYS])


def fig_curves(curves: dict[str, str | Path], out: str | Path, title: str = "") -> None:
    """Paper Fig. 6 / 7: FID of 1-step (and 2-step) sampling during distillation, one line per run."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharex=True)
    plotted = 0
    for label, path in curves.items():
        df = read_curve(path)
        for ax, key in zip(axes, FID_KEYS):
            d = df.dropna(subset=[key])
            if len(d):
                ax.plot(d["step"], d[key], marker="o", label=label)
                plotted += 1
    for ax, key in zip(axes, FID_KEYS):
        ax.set_xlabel("training step")
        ax.set_ylabel(f"FID, {key.split('_')[-1].replace('step', '-step')} sampling")
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "no periodic FID logged\n(distill.eval_every = 0)", ha="center", va="center",
                    transform=ax.transAxes)
    fig.suptitle(f"FID during distillation{': ' + title if title else ''}")
    _save(fig, out)
    plt.close(fig)
    if not plotted:
        print(f"report: warning: none of {list(curves)} has periodic FID values", file=sys.stderr)


# ---------------------------------------------------------------------------------------------------------------
# text-to-image: samples beside their prompts
# ---------------------------------------------------------------------------------------------------------------


def prompt_grid(sets: dict[str, Path], prompts: list[str], out: str | Path, rows: int = 8, scale: int = 4) -> None:
    """A PNG with one row per prompt (its text on the left) and one column per sample set (named on top): the first
    sample of each of the first ``rows`` prompts. Sample i of a set was generated from prompt row ``labels[i]``."""
    import numpy as np
    from PIL import Image, ImageDraw

    from dd.evaluation.sample_sets import load_sample_set

    loaded = {name: load_sample_set(path, require_labels=True) for name, path in sets.items()}
    first = next(iter(loaded.values()))
    rows = min(rows, len(prompts))
    size = first.images.shape[-1] * scale
    head_h, pad = 18, 4
    shown = [p[:60] for p in prompts[:rows]]
    text_w = int(max(ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength(p) for p in shown)) + 12
    canvas = Image.new("RGB", (text_w + len(loaded) * (size + pad), head_h + rows * (size + pad)), "white")
    draw = ImageDraw.Draw(canvas)
    for c, name in enumerate(loaded):
        draw.text((text_w + c * (size + pad), 2), name, fill="black")
    for r in range(rows):
        y = head_h + r * (size + pad)
        draw.text((2, y + size // 2 - 6), shown[r], fill="black")
        for c, s in enumerate(loaded.values()):
            hits = np.flatnonzero(s.labels == r)
            if not len(hits):
                raise ValueError(f"{s.source}: no sample of prompt row {r}")
            img = Image.fromarray(np.asarray(s.images[hits[0]]).transpose(1, 2, 0)).resize((size, size), Image.NEAREST)
            canvas.paste(img, (text_w + c * (size + pad), y))
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    canvas.save(buf, format="PNG")
    atomic_write_bytes(Path(out), buf.getvalue())


# ---------------------------------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="what", required=True)
    t = sub.add_parser("tables", help="table1/table2 (CSV + Markdown) of an experiment")
    t.add_argument("--dir", required=True, help="the experiment's results folder (results/<experiment>)")
    t.add_argument("--teacher", required=True, help="the teacher column's value")
    t.add_argument("--sets", nargs="+", required=True, help="sample set names")
    t.add_argument("--table2-sets", nargs="*", help="the teacher-involved sets (default: dd-teacher-*)")
    t.add_argument("--out-dir", help="default: DIR/tables")
    f = sub.add_parser("fig1", help="FID vs seconds per image")
    f.add_argument("--tables", nargs="+", required=True)
    f.add_argument("--title", default="")
    f.add_argument("--out", required=True)
    g = sub.add_parser("prompt-grid", help="text-to-image: samples of several sets beside their prompts")
    g.add_argument("--sets", nargs="+", required=True, metavar="NAME=SAMPLES.npz")
    g.add_argument("--prompts", required=True, help="the prompt file whose rows the sample labels are")
    g.add_argument("--column", default="prompt")
    g.add_argument("--rows", type=int, default=8)
    g.add_argument("--out", required=True)
    c = sub.add_parser("curves", help="FID vs training step of several distillation runs")
    c.add_argument("curves", nargs="+", metavar="LABEL=METRICS.jsonl", help="'_' in a label prints as a space")
    c.add_argument("--title", default="")
    c.add_argument("--out", required=True)


def main(args: argparse.Namespace) -> int:
    try:
        if args.what == "tables":
            t1, t2 = write_tables(args.dir, args.sets, args.teacher, args.table2_sets, args.out_dir)
            print(to_markdown(t1, "Table 1"))
            print(to_markdown(t2, "Table 2"))
        elif args.what == "fig1":
            fig_fid_vs_time(args.tables, args.out, args.title)
        elif args.what == "prompt-grid":
            from dd.pipeline.prompt_files import read_prompts

            sets = dict(item.split("=", 1) if "=" in item else (Path(item).stem, item) for item in args.sets)
            prompts = [r[args.column] for r in read_prompts(args.prompts, args.column)]
            prompt_grid({k: Path(v) for k, v in sets.items()}, prompts, args.out, args.rows)
        else:
            curves = {}
            for item in args.curves:
                if "=" not in item:
                    raise ValueError(f"curve {item!r}: expected LABEL=METRICS.jsonl")
                label, path = item.split("=", 1)
                curves[label.replace("_", " ")] = path
            fig_curves(curves, args.out, args.title)
    except (FileNotFoundError, ValueError) as e:
        print(f"python -m dd report: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":  # `python -m dd.pipeline.report ...` without the dd dispatcher
    _parser = argparse.ArgumentParser(prog="python -m dd.pipeline.report", description=__doc__.splitlines()[0])
    add_arguments(_parser)
    sys.exit(main(_parser.parse_args()))
