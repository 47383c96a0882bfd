"""One run per run directory: a lease-based lock that rank 0 takes and renews.

`<run dir>/run.lock` holds the holder's host, pid, Slurm job id and when it last renewed the
lease. A second job into the same directory is refused with one line naming the holder. The
lock never blocks a legitimate restart:
- a requeued Slurm job (the same SLURM_JOB_ID, on any host) takes it over;
- a holder on this host whose pid is gone is taken over at once;
- a holder anywhere that stopped renewing for `faults.lock_stale_s` (it died with its node, or
  its file system went away) is taken over with a notice. A holder on another host is judged by
  the lease alone: its pid means nothing here.
A thread renews the lease every `stale_s / 4` seconds (at most every minute), so a long step
never makes a live run look stale. The lock is removed at exit, when it is still ours.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mlra_mega.errors import ConfigError
from mlra_mega.files import atomic_write_text

__all__ = ["LOCK", "RunLock", "describe"]

LOCK = "run.lock"


def _me() -> dict[str, Any]:
    return {"host": socket.gethostname(), "pid": os.getpid(), "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
            "renewed": time.time()}


def describe(holder: dict[str, Any]) -> str:
    job = f", Slurm job {holder['slurm_job_id']}" if holder.get("slurm_job_id") else ""
    return f"host {holder.get('host')}, pid {holder.get('pid')}{job}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunLock:
    """`with RunLock(run_dir, stale_s, log):` holds the run directory for this job."""

    def __init__(self, run_dir: Path, stale_s: float, log: Callable[[str], None] = print) -> None:
        self.path = Path(run_dir) / LOCK
        self.stale_s = stale_s
        self.log = log
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._mine: dict[str, Any] | None = None

    def _read(self) -> dict[str, Any] | None:
        try:
            holder = json.loads(self.path.read_text())
            return holder if isinstance(holder, dict) else {}
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}  # half-written or garbage: nobody can be said to hold it

    def _write(self, record: dict[str, Any]) -> None:
        atomic_write_text(self.path, json.dumps(record) + "\n")

    def _takeover_reason(self, holder: dict[str, Any], me: dict[str, Any]) -> str | None:
        """Why this job may take the lock from `holder`, or None when the holder still has it."""
        if not holder:
            return "the lock file was unreadable"
        if me["slurm_job_id"] and holder.get("slurm_job_id") == me["slurm_job_id"]:
            return f"it is this Slurm job's own lock (job {me['slurm_job_id']}, requeued)"
        age = time.time() - float(holder.get("renewed", 0) or 0)
        if holder.get("host") == me["host"] and isinstance(holder.get("pid"), int):
            if holder["pid"] == me["pid"]:
                return "it is this process's own lock"
            if not _pid_alive(holder["pid"]):
                return f"its holder ({describe(holder)}) is no longer running"
        if age > self.stale_s:
            return f"its holder ({describe(holder)}) has not renewed it for {age:.0f}s (faults.lock_stale_s=" \
                   f"{self.stale_s:g})"
        return None

    def acquire(self) -> None:
        me = _me()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(me) + "\n")
        except FileExistsError:
            holder = self._read() or {}
            reason = self._takeover_reason(holder, me)
            if reason is None:
                age = time.time() - float(holder.get("renewed", 0) or 0)
                raise ConfigError("run.dir", f"{self.path.parent} is in use by another run ({describe(holder)}, "
                                  f"lease renewed {age:.0f}s ago)",
                                  "wait for that run to end, or give this one another run.dir; a holder that "
                                  f"stops renewing for faults.lock_stale_s={self.stale_s:g}s is taken over") from None
            self._write(me)
            self.log(f"[train] took over {self.path}: {reason}")
        self._mine = me
        self._thread = threading.Thread(target=self._renew, name="run-lock", daemon=True)
        self._thread.start()

    def _renew(self) -> None:
        every = max(0.05, min(60.0, self.stale_s / 4))
        while not self._stop.wait(every):
            holder = self._read()
            if holder is None or not self._is_mine(holder):
                return  # taken over (we were judged dead) or removed: nothing of ours to renew
            try:
                self._write({**self._mine, "renewed": time.time()})
            except OSError:
                pass  # a file system hiccup: the next renewal tries again

    def _is_mine(self, holder: dict[str, Any]) -> bool:
        return self._mine is not None and all(holder.get(k) == self._mine[k] for k in ("host", "pid"))

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        holder = self._read()
        if holder is not None and self._is_mine(holder):
            self.path.unlink(missing_ok=True)
        self._mine = None

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
