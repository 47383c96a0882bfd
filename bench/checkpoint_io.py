"""Checkpoint save and resume at three model sizes: sync against async (how long the step loop
stalls), the cost of each verify mode, and the load time at the same layout and resharded.

One process (DP=1, ZeRO-1, fp32) holds a GPT-2-style model after one optimizer step (so the AdamW
moments exist), and writes checkpoints with `train.checkpoint.save_checkpoint` into a temporary
directory on the same disk as the repository:

- sync: the call's time (the step loop waits for all of it);
- async: the call's time (the snapshot to CPU memory: the stall) and the time until the writer
  thread has published the checkpoint, at the first async save (which allocates the snapshot) and
  at the next (which copies into the same buffers: every save after the first);
- verify: the resume-side check of the manifest, sizes only (`size`) and with every hash
  (`sha256`); the hashing a `sha256` save adds is the sync save time difference;
- load: DeepSpeed's own load at this layout, and the layout-free read plus load of a resharded resume.

    python bench/checkpoint_io.py [--sizes 4M 50M 350M] [--out bench/results/checkpoint_io.json]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import RESULTS, table, write_json

# name -> (layers, hidden, heads, vocab, sequence)
SIZES = {
    "4M": (4, 256, 4, 4096, 128),
    "50M": (6, 768, 12, 8192, 128),
    "350M": (24, 1024, 16, 50304, 128),
}


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure(name: str, work: Path) -> dict:
    import torch

    from mlra_mega import distributed
    from mlra_mega.config import ModelConfig, OptimConfig, ParallelConfig, TrainConfig, ZeroConfig
    from mlra_mega.model.build import build_model, count_parameters
    from mlra_mega.train.checkpoint import Checkpoint, checkpoint_problem, load_checkpoint, load_resharded, \
        save_checkpoint
    from mlra_mega.train.engine import build_engine, release_engine

    layers, hidden, heads, vocab, seq = SIZES[name]
    ctx = distributed.setup(ParallelConfig(tensor=1), seed=0)
    try:
        cfg = ModelConfig(num_layers=layers, hidden_size=hidden, num_heads=heads, vocab_size=vocab, seq_length=seq)
        model = build_model(cfg, tensor_parallel=1)
        train = TrainConfig(global_batch_size=1, micro_batch_size=1, steps=10)
        engine, _ = build_engine(model, ctx, train, OptimConfig(), ZeroConfig(stage=1))
        tokens = torch.randint(0, vocab, (1, seq))
        loss = engine(tokens, torch.arange(seq).unsqueeze(0), None, labels=tokens).mean()
        engine.backward(loss)
        engine.step()
        sidecar = {"step": 1, "layout": {"tensor": 1, "data": 1, "zero_stage": 1}, "config": {}}
        out: dict = {"parameters": count_parameters(cfg)}
        step = [0]

        def save(verify: str, background: bool) -> Path:
            step[0] += 1
            root = work / name
            save_checkpoint(engine, root, step[0], sidecar, ctx=ctx, tokenizer_dir=None, keep=1, verify=verify,
                            background=background)
            return root / f"step{step[0]:08d}"

        files = engine.checkpoint_engine
        for verify in ("size", "sha256"):
            path: list[Path] = []
            out[f"sync_{verify}_s"] = _timed(lambda: path.append(save(verify, False)))
        out["bytes"] = sum(p.stat().st_size for p in path[0].rglob("*") if p.is_file())
        # The first async save allocates its CPU snapshot; later ones copy into the same buffers.
        stall = _timed(lambda: path.append(save("size", True)))
        out["async_first_stall_s"] = stall
        out["async_first_total_s"] = stall + _timed(files.wait)
        stall = _timed(lambda: path.append(save("size", True)))
        out["async_stall_s"] = stall
        out["async_total_s"] = stall + _timed(files.wait)
        ckpt = path[-1]
        out["verify_size_s"] = _timed(lambda: checkpoint_problem(ckpt))
        sha = save("sha256", False)
        out["verify_sha256_s"] = _timed(lambda: checkpoint_problem(sha, verify_hashes=True))
        out["load_same_layout_s"] = _timed(lambda: load_checkpoint(engine, Checkpoint(sha)))
        out["load_resharded_s"] = _timed(lambda: load_resharded(engine, Checkpoint(sha), sidecar["layout"], ctx,
                                                                seed=0, step=1))
        shutil.rmtree(work / name, ignore_errors=True)
        release_engine(engine)
        return out
    finally:
        distributed.teardown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--out", default=str(RESULTS / "checkpoint_io.json"))
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory(dir=Path(__file__).resolve().parent.parent) as tmp:
        for name in args.sizes:
            results[name] = measure(name, Path(tmp))
            print(f"[bench] {name}: {results[name]}", flush=True)
    rows = [[n, f"{r['parameters'] / 1e6:.1f}M", f"{r['bytes'] / 2**30:.2f}", r["sync_size_s"], r["sync_sha256_s"],
             r["async_first_stall_s"], r["async_stall_s"], r["async_total_s"], r["verify_size_s"], r["verify_sha256_s"],
             r["load_same_layout_s"], r["load_resharded_s"]] for n, r in results.items()]
    print(table(["model", "params", "GiB", "sync s", "sync+sha s", "async 1st stall s", "async stall s", "async total s",
                 "verify size s", "verify sha256 s", "load s", "reshard load s"], rows,
                "Checkpoint I/O, one process, ZeRO-1 fp32 (the step loop waits for 'sync' or for 'async stall')"))
    write_json(args.out, {"results": results})


if __name__ == "__main__":
    main()
