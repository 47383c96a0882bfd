"""One measured run of our trainer, for the benchmark scripts (run under torchrun by
`bench.common.run_worker`): configs/quickstart.yaml with the given overrides, tracking off.

Writes JSON (rank 0) with the step-to-step wall times, and per rank: the bytes of its parameter
shards, of the optimizer's own parameter copies (ZeRO's fp32 partitions) and of its optimizer
state, the activations autograd saves in one micro-batch's forward, the growth of its peak
resident memory over the process's size before training (libraries and buffers included), and,
with `--tev-reps N`, N direct timings of one TEV computation (each started together after a
barrier, all-reduce included).

    python bench/trainer_worker.py --result OUT.json [--tev-reps N] [overrides ...]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import REPO, StepClock


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def _tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def memory_of(trainer: Any) -> dict[str, int]:
    """Bytes this rank holds: parameter shards (ZeRO-3's own partition where it partitions), the
    optimizer's separate parameter copies, and optimizer state."""
    import torch

    model_params = list(trainer.model.parameters())
    params = _tensor_bytes(p.ds_tensor if hasattr(p, "ds_tensor") else p for p in model_params)
    ids = {id(p) for p in model_params}
    opt = trainer.engine.basic_optimizer
    copies = _tensor_bytes(p for g in opt.param_groups for p in g["params"] if id(p) not in ids)
    state = _tensor_bytes(v for s in opt.state.values() for v in s.values()
                          if isinstance(v, torch.Tensor) and v.dim() > 0)
    return {"param_bytes": params, "optimizer_param_copy_bytes": copies, "optimizer_state_bytes": state}


def saved_activation_bytes(trainer: Any) -> int:
    """Bytes autograd saves for backward in one training micro-batch's forward (parameters not
    counted): the activation memory, which is where MLRA and MHA differ beyond their weights."""
    import torch

    params = {p.untyped_storage().data_ptr() for p in trainer.model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    batch = trainer.batches.next_global_batch()[0]
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = trainer.step_object.loss(batch)
    del loss
    return sum(seen.values())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--result", required=True)
    ap.add_argument("--tev-reps", type=int, default=0)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()

    import torch.distributed as dist

    from mlra_mega.config import load_config
    from mlra_mega.model.build import count_parameters
    from mlra_mega.train.callbacks import Callback
    from mlra_mega.train.run import train
    from mlra_mega.metrics.tev import embedding_tev

    clock, out = StepClock(), {}
    base_rss = _rss_bytes()

    class Measure(Callback):
        def on_step_end(self, trainer, metrics) -> None:
            clock.tick()

        def on_fit_end(self, trainer) -> None:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            mine = {**memory_of(trainer), "peak_rss_growth_bytes": peak - base_rss,
                    "activation_bytes": saved_activation_bytes(trainer)}
            tev = []
            for _ in range(args.tev_reps):
                if dist.is_initialized():
                    dist.barrier()
                start = time.perf_counter()
                embedding_tev(trainer.model, trainer.model_cfg.vocab_size, trainer.ctx.tp_group)
                tev.append(time.perf_counter() - start)
            ranks = [mine]
            if dist.is_initialized() and dist.get_world_size() > 1:
                ranks = [None] * dist.get_world_size()
                dist.all_gather_object(ranks, mine)
            out.update(tev_times_s=tev, ranks=ranks, parameters=count_parameters(trainer.model_cfg),
                       tokens_per_step=trainer.tokens_per_step)

    # One fresh run directory for all ranks of this launch (a checkpoint's parts are merged there).
    launch = os.environ.get("TORCHELASTIC_RUN_ID") or str(os.getpid())
    work = Path(tempfile.gettempdir()) / f"bench-run-{launch}"
    cfg = load_config(REPO / "configs" / "quickstart.yaml",
                      ["eval.interval=0", "tracking.enabled=false", "train.log_interval=1000000",
                       f"run.dir={work / 'run'}", *args.overrides])
    train(cfg, [Measure()], log=lambda s: None)
    if os.environ.get("RANK", "0") == "0":  # the process group is gone by now
        Path(args.result).write_text(json.dumps({"step_times_s": clock.times, **out}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
