"""A small logger interface: training and sampling code log through it, the pipeline points it at MLflow."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Protocol


class Logger(Protocol):
    def log_params(self, params: dict[str, Any]) -> None: ...
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None: ...
    def close(self) -> None: ...


class NullLogger:
    def log_params(self, params): pass
    def log_metrics(self, metrics, step=None): pass
    def close(self): pass


class JsonlLogger:
    """Append-only JSON-lines log; on resume, lines from steps after the resume point are dropped."""

    def __init__(self, path: Path, resume_step: int | None = None, echo_every: int = 0):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.echo_every = echo_every
        if resume_step is not None and self.path.exists():
            keep = [l for l in self.path.read_text().splitlines()
                    if l.strip() and json.loads(l).get("step", -1) is not None and json.loads(l).get("step", -1) <= resume_step]
            self.path.write_text("".join(l + "\n" for l in keep))
        elif resume_step is None:
            self.path.write_text("")
        self._f = open(self.path, "a")

    def log_params(self, params):
        self._f.write(json.dumps({"params": params}, default=str) + "\n")
        self._f.flush()

    def log_metrics(self, metrics, step=None):
        self._f.write(json.dumps({"step": step, **metrics}) + "\n")
        self._f.flush()
        if self.echo_every and step is not None and step % self.echo_every == 0:
            print(f"step {step}: " + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()), file=sys.stderr)

    def close(self):
        self._f.close()


class MultiLogger:
    def __init__(self, *loggers):
        self.loggers = [l for l in loggers if l is not None]

    def log_params(self, params):
        for l in self.loggers:
            l.log_params(params)

    def log_metrics(self, metrics, step=None):
        for l in self.loggers:
            l.log_metrics(metrics, step)

    def close(self):
        for l in self.loggers:
            l.close()
