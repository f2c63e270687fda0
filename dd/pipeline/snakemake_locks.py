"""Stale Snakemake directory locks after a hard kill.

Snakemake locks its working directory (``.snakemake/locks/``) while it runs and removes the locks when it exits.
A Snakemake killed with SIGKILL (the OOM killer, a preempted login session, ``kill -9`` of its process group)
cannot, and the next ``snakemake --rerun-incomplete`` then refuses to start until the user runs
``snakemake --unlock``, which is unsafe while another Snakemake still runs in the folder. Two pieces make the
resume safe without guessing:

* ``record_owner`` (the Snakefile's ``onstart:`` hook, so only runs that hold the locks) writes the running
  Snakemake's host, pid and process start time to ``.snakemake/dd-owners/``;
* ``python -m dd clear-stale-locks`` (before ``snakemake --rerun-incomplete``) removes the locks only when every
  recorded owner is a process of *this* host that no longer exists. An owner on another host (a shared file
  system) or a live owner keeps the locks, as does a lock with no recorded owner: then Snakemake's own message
  applies. Snakemake offers no hook that runs before it takes its locks, hence a command of its own.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
from pathlib import Path

OWNERS = "dd-owners"


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (field 22 of /proc/PID/stat); None if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _alive(owner: dict) -> bool:
    start = _start_time(owner["pid"])
    return start is not None and start == owner.get("start")   # same pid and start: not a reused pid


def record_owner(snakemake_dir: str | os.PathLike = ".snakemake") -> Path:
    folder = Path(snakemake_dir) / OWNERS
    folder.mkdir(parents=True, exist_ok=True)
    pid = os.getpid()
    record = {"host": socket.gethostname(), "pid": pid, "start": _start_time(pid)}
    path = folder / f"{record['host']}-{pid}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record))
    os.replace(tmp, path)
    return path


def clear_stale_locks(snakemake_dir: str | os.PathLike = ".snakemake") -> list[str]:
    """Remove the directory locks if all their recorded owners are dead processes of this host.
    Returns the owners found dead (empty when nothing was cleared)."""
    snakemake_dir = Path(snakemake_dir)
    locks = snakemake_dir / "locks"
    folder = snakemake_dir / OWNERS
    if not locks.is_dir() or not any(locks.iterdir()) or not folder.is_dir():
        return []
    host = socket.gethostname()
    owners = []
    for path in folder.glob("*.json"):
        try:
            owners.append((path, json.loads(path.read_text())))
        except (OSError, ValueError):
            return []                      # unreadable record: do not guess
    if not owners or any(o.get("host") != host or _alive(o) for _, o in owners):
        return []
    shutil.rmtree(locks, ignore_errors=True)
    for path, _ in owners:
        path.unlink(missing_ok=True)
    return [f"{o['host']}:{o['pid']}" for _, o in owners]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--directory", type=Path, default=Path("."), help="the Snakemake working directory")


def main(args: argparse.Namespace) -> int:
    cleared = clear_stale_locks(args.directory / ".snakemake")
    if cleared:
        print(f"removed the Snakemake locks of killed run(s) {', '.join(cleared)}")
    else:
        print("no stale Snakemake locks (none, or their owner may still run: see `snakemake --unlock`)")
    return 0
