"""The one way tests run code on several processes: torchrun, gloo, per-rank results.

A test module registers its multi-process cases with `@dist_case(1, 2, 4)`. The first test
that asks for a result of that module at world size W starts ONE torchrun launch of W
processes that runs every case of the module registered for W (a 4-process launch costs
25-40 s of imports on 2 cores, so one per module and size, not one per case). Each case runs
on every rank inside an initialised gloo process group; its return value (anything picklable)
or its traceback is collected per rank. `dist_result(module, W, case, **args)` returns the list of
per-rank values, or fails the test with every failing rank's traceback.

Arguments reach the cases as keyword arguments: `args` (picklable values, e.g. a fixture's
paths) go to the launch in a file, and each case gets those of them its signature names. One
launch serves every case of a module and size that is asked for with the same arguments.
"""

from __future__ import annotations

import functools
import inspect
import os
import pickle
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent
ARGS_FILE = "args.pkl"  # in the launch's output directory: the cases' keyword arguments
LAUNCH_TIMEOUT_S = float(os.environ.get("MLRA_TEST_LAUNCH_TIMEOUT", "600"))


@dataclass(frozen=True)
class Case:
    fn: Callable[[], Any]
    world_sizes: tuple[int, ...]


# module name -> case name -> Case; filled at import, in the test process and in each worker.
REGISTRY: dict[str, dict[str, Case]] = {}


def dist_case(*world_sizes: int) -> Callable[[Callable[[], Any]], Callable[[], Any]]:
    """Registers `fn` to run on every rank at each of `world_sizes`."""

    def register(fn: Callable[[], Any]) -> Callable[[], Any]:
        REGISTRY.setdefault(fn.__module__, {})[fn.__name__] = Case(fn, tuple(world_sizes))
        return fn

    return register


@dataclass(frozen=True)
class Outcome:
    ok: bool
    value: Any = None
    error: str = ""


def case_kwargs(fn: Callable[..., Any], args: dict[str, Any]) -> dict[str, Any]:
    """The arguments `fn` takes by name (all of them if it takes **kwargs)."""
    params = inspect.signature(fn).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return dict(args)
    return {k: v for k, v in args.items() if k in params}


@functools.cache
def _launch(module: str, world_size: int, frozen_args: tuple[tuple[str, Any], ...] = ()
            ) -> tuple[dict[str, list[Outcome]], str]:
    out_dir = tempfile.mkdtemp(prefix=f"dist-{module.rsplit('.', 1)[-1]}-w{world_size}-")
    with (Path(out_dir) / ARGS_FILE).open("wb") as f:
        pickle.dump(dict(frozen_args), f)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world_size}",
           "-m", "tests.dist_worker", module, str(world_size), out_dir]
    env = dict(os.environ, PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
               OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S)
        log = proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as exc:
        log = f"torchrun launch timed out after {LAUNCH_TIMEOUT_S:.0f}s (a hang?)\n{exc.stdout or ''}{exc.stderr or ''}"
    results: dict[str, list[Outcome]] = {}
    for rank in range(world_size):
        path = Path(out_dir) / f"rank{rank}.pkl"
        if not path.exists():
            continue
        with path.open("rb") as f:
            for name, outcome in pickle.load(f).items():
                results.setdefault(name, [None] * world_size)[rank] = outcome  # type: ignore[list-item]
    return results, log


def dist_result(module: str, world_size: int, case: str, **args: Any) -> list[Any]:
    """Per-rank return values of `case(**args)` at `world_size` (fails the test if any rank failed)."""
    frozen = tuple(sorted(args.items()))
    results, log = _launch(module, world_size, frozen)
    outcomes = results.get(case)
    if outcomes is None or any(o is None for o in outcomes):
        pytest.fail(f"case {case!r} produced no result on some rank at world size {world_size}; "
                    f"launcher output (tail):\n{log[-6000:]}")
    failures = [f"--- rank {r} ---\n{o.error}" for r, o in enumerate(outcomes) if not o.ok]
    if failures:
        pytest.fail(f"case {case!r} failed at world size {world_size}:\n" + "\n".join(failures))
    return [o.value for o in outcomes]
