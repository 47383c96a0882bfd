"""Worker side of tests/dist.py: run one module's cases for one world size on this rank.

Started by torchrun as `python -m tests.dist_worker MODULE WORLD_SIZE OUT_DIR`. Cases run in
name order, each between barriers, so a case that fails on one rank costs at most the gloo
timeout, not the whole launch.
"""

from __future__ import annotations

import datetime
import importlib
import os
import pickle
import sys
import traceback
import warnings
from pathlib import Path

import torch.distributed as dist

from tests.dist import ARGS_FILE, REGISTRY, Outcome, case_kwargs

CASE_TIMEOUT = datetime.timedelta(seconds=float(os.environ.get("MLRA_TEST_GLOO_TIMEOUT", "120")))


def main() -> int:
    module, world_size, out_dir = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])
    warnings.filterwarnings("ignore")
    dist.init_process_group("gloo", timeout=CASE_TIMEOUT)
    assert dist.get_world_size() == world_size, (dist.get_world_size(), world_size)
    rank = dist.get_rank()
    importlib.import_module(module)
    with (out_dir / ARGS_FILE).open("rb") as f:
        args = pickle.load(f)
    results: dict[str, Outcome] = {}
    for name, case in sorted(REGISTRY.get(module, {}).items()):
        if world_size not in case.world_sizes:
            continue
        try:
            value = case.fn(**case_kwargs(case.fn, args))
            pickle.dumps(value)
            results[name] = Outcome(True, value)
        except BaseException:  # noqa: BLE001 - reported to the test, which fails with it
            results[name] = Outcome(False, error=traceback.format_exc())
        try:
            dist.barrier()
        except Exception:  # noqa: BLE001 - a peer died in the case; keep what we have
            results.setdefault(name, Outcome(False, error=traceback.format_exc()))
            break
    tmp = out_dir / f"rank{rank}.pkl.tmp"
    with tmp.open("wb") as f:
        pickle.dump(results, f)
    tmp.rename(out_dir / f"rank{rank}.pkl")
    try:
        dist.destroy_process_group()
    except Exception:  # noqa: BLE001
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
