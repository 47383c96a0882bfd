"""Per-rank log files and stack dumps, so a failed or hung job can be read rank by rank.

`RankLog` copies everything this process writes to its stdout and stderr file descriptors
(Python prints, DeepSpeed's and megatron's loggers, C++ messages from the communication
libraries) into `<run dir>/logs/rankNNNNN.log`, while the console gets it as before. It also
writes `rankNNNNN.json` (host, pid) and points `faulthandler` at the log: a fatal signal, a
`SIGUSR2` (`mlra-mega stacks RUN_DIR` sends it to every rank of the run on this host) or the
`Watchdog` (no finished step for `faults.watchdog_minutes`) dumps every thread's stack there,
written by faulthandler's own C code, so it works even when Python is stuck.
"""

from __future__ import annotations

import faulthandler
import json
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

import psutil

from mlra_mega.train.callbacks import Callback, Priority

__all__ = ["DUMP_SIGNAL", "RankLog", "Watchdog", "current", "log_paths", "request_stacks"]

DUMP_SIGNAL = signal.SIGUSR2
_current: RankLog | None = None


def log_paths(run_dir: Path, rank: int) -> tuple[Path, Path]:
    """(the rank's log file, its host/pid card)."""
    base = Path(run_dir) / "logs" / f"rank{rank:05d}"
    return base.with_suffix(".log"), base.with_suffix(".json")


def current() -> RankLog | None:
    """The open RankLog of this process, if any (for exits that bypass `finally`)."""
    return _current


class RankLog:
    """Tee of fds 1 and 2 into the rank's log file, for the length of a `with` block."""

    def __init__(self, run_dir: Path, rank: int, launcher: str = "") -> None:
        self.path, self.card = log_paths(run_dir, rank)
        self.rank, self.launcher = rank, launcher
        self._saved: dict[int, int] = {}
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._file: Any = None

    def __enter__(self) -> RankLog:
        global _current
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "ab", buffering=0)  # noqa: SIM115 - closed in close()
        self._file.write(f"==== rank {self.rank} pid {os.getpid()} on {socket.gethostname()} at "
                         f"{time.strftime('%Y-%m-%d %H:%M:%S')} ({self.launcher or 'launcher unknown'})\n".encode())
        self.card.write_text(json.dumps({"rank": self.rank, "host": socket.gethostname(), "pid": os.getpid(),
                                         "started": psutil.Process().create_time(), "log": str(self.path)}) + "\n")
        for fd, stream in ((1, sys.stdout), (2, sys.stderr)):
            stream.flush()
            read_end, write_end = os.pipe()
            self._saved[fd] = os.dup(fd)
            os.dup2(write_end, fd)
            os.close(write_end)
            thread = threading.Thread(target=self._pump, args=(read_end, self._saved[fd]), daemon=True,
                                      name=f"rank-log-{fd}")
            thread.start()
            self._threads.append(thread)
        faulthandler.enable(file=self._file, all_threads=True)
        faulthandler.register(DUMP_SIGNAL, file=self._file, all_threads=True, chain=False)
        _current = self
        return self

    def _pump(self, read_end: int, console: int) -> None:
        while True:
            data = os.read(read_end, 65536)
            if not data:
                os.close(read_end)
                return
            os.write(console, data)
            with self._lock:
                self._file.write(data)

    @property
    def fileno(self) -> int:
        return self._file.fileno()

    def close(self) -> None:
        """Gives the console its descriptors back and drains what is still in the pipes."""
        global _current
        if self._file is None:
            return
        faulthandler.cancel_dump_traceback_later()
        faulthandler.unregister(DUMP_SIGNAL)
        faulthandler.enable(file=sys.__stderr__, all_threads=True)
        sys.stdout.flush()
        sys.stderr.flush()
        for fd, saved in self._saved.items():
            os.dup2(saved, fd)  # closes the pipe's last write end: the pump sees EOF
        for thread in self._threads:
            thread.join(timeout=5)
        for saved in self._saved.values():
            os.close(saved)
        self._file.close()
        self._file, self._saved, self._threads = None, {}, []
        _current = None

    def __exit__(self, *exc: Any) -> None:
        self.close()


class Watchdog(Callback):
    """Dumps every thread's stack into the rank log after `minutes` without a finished step or
    evaluation (and again every `minutes` while it lasts); 0 turns it off."""

    priority = Priority.WATCHDOG
    name = "watchdog"

    def __init__(self, minutes: float, log: RankLog | None) -> None:
        self.seconds, self.log = minutes * 60, log

    def _arm(self) -> None:
        if self.seconds > 0 and self.log is not None:
            faulthandler.dump_traceback_later(self.seconds, repeat=True, file=self.log.fileno)

    def on_fit_start(self, trainer: Any) -> None:
        self._arm()

    def on_step_end(self, trainer: Any, metrics: Any) -> None:
        self._arm()  # re-arming restarts the countdown

    def on_eval_end(self, trainer: Any, step: int, metrics: dict[str, float]) -> None:
        self._arm()

    def on_fit_end(self, trainer: Any) -> None:
        faulthandler.cancel_dump_traceback_later()


class HangDrill(Callback):
    """A drill for the watchdog: global rank `rank` stalls `seconds` inside step `step` (after its
    backward, before the optimizer), as a rank stuck in a kernel or a collective would."""

    priority = Priority.WATCHDOG
    name = "hang_drill"

    def __init__(self, step: int, rank: int, seconds: float) -> None:
        self.step, self.rank, self.seconds = step, rank, seconds

    def on_before_optimizer_step(self, trainer: Any) -> None:
        if trainer.ctx.rank == self.rank and trainer.step == self.step:
            print(f"[drill] rank {self.rank} stalls {self.seconds:g}s in step {self.step}", flush=True)
            time.sleep(self.seconds)


def request_stacks(run_dir: Path) -> list[tuple[int, str]]:
    """Sends the dump signal to every rank of the run that runs on this host: [(rank, outcome)]."""
    out = []
    for card in sorted((Path(run_dir) / "logs").glob("rank*.json")):
        info = json.loads(card.read_text())
        if info["host"] != socket.gethostname():
            out.append((info["rank"], f"on {info['host']}: run `mlra-mega stacks` there"))
            continue
        try:
            # The same process that wrote the card, not a later one that got its pid.
            if psutil.Process(info["pid"]).create_time() != info["started"]:
                raise psutil.NoSuchProcess(info["pid"])
            os.kill(info["pid"], DUMP_SIGNAL)
            out.append((info["rank"], f"stacks written to {info['log']}"))
        except (psutil.NoSuchProcess, ProcessLookupError):
            out.append((info["rank"], f"pid {info['pid']} is no longer running"))
    return out
