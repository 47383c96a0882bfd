"""Framework overhead: our trainer against a bare megatron-core + DeepSpeed loop and a plain
Hugging Face GPT-2 loop with torch AdamW, the same model size, side by side.

- ours: `mlra_mega.train.run.train` on configs/quickstart.yaml with standard attention, as a user
  runs it (TEV every step, metrics.jsonl, the embedded MLflow store, per-rank logs); the sample
  corpus through megatron-core's GPTDataset.
- ours-no-tracking: the same with `tracking.enabled=false` (TEV still every step): the
  difference to ours is what logging every step to MLflow costs.
- ours-send-each: ours with `tracking.send_interval_s=0`, the behaviour before it existed (one
  MLflow log_batch per step from the sender thread, which took the GIL from the step loop).
- bare: the same megatron-core GPTModel (built by `mlra_mega.model.build`) in
  `deepspeed.initialize` with the same ZeRO stage, clipping and torch AdamW, reading the same
  corpus through megatron-core's GPTDataset (`mlra_mega.data`), a loss `.item()` per step;
  nothing from `mlra_mega.train` is imported. The reference: what our trainer adds to it.
- bare-in-memory: the bare loop on random batches made up front (no data reading at all).
- hf: transformers' GPT2LMHeadModel of the same width, depth, heads, FFN, vocabulary and sequence
  (SDPA attention), torch AdamW, clip_grad_norm_, gradient accumulation to the same batch.

A step is the wall time between consecutive step ends (data, optimizer and callbacks included).
Rounds run every contestant once each, in a fresh process; the result is the median over rounds
of each round's median step time after warm-up, with the range over rounds, and the median of
each round's ratio to that round's bare loop (the paired ratio, the goal's measure).

    python bench/overhead.py [--model quickstart|gpt2-small-4l] [--rounds 3] [--steps 60]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import REPO, RESULTS, StepClock, model_overrides, run_worker, spread, steady, table, write_json

CONTESTANTS = ("ours", "ours-no-tracking", "ours-send-each", "bare", "bare-in-memory", "hf")
EXTRA = {"ours": [], "ours-no-tracking": ["tracking.enabled=false"],
         # before the fix: the tracker's sender thread sent every record the moment it arrived
         "ours-send-each": ["tracking.send_interval_s=0"]}


def _config(model: str, steps: int, run_dir: Path, extra: list[str]):
    from mlra_mega.config import load_config

    return load_config(REPO / "configs" / "quickstart.yaml",
                       [*model_overrides(model), "model.attention=mha", f"train.steps={steps}", "eval.interval=0",
                        "train.log_interval=1000000", f"run.dir={run_dir}", f"run.root={run_dir.parent}", *extra])


def _resolved(cfg):
    """The config with the tokenizer's vocabulary filled in, as the trainer resolves it."""
    import dataclasses

    from mlra_mega.data.tokenizer import check_vocab, load_tokenizer

    vocab = check_vocab(cfg.model.vocab_size, load_tokenizer(cfg.data.tokenizer))
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=vocab))


def worker_ours(model: str, steps: int, work: Path, extra: list[str]) -> list[float]:
    from mlra_mega.train.callbacks import Callback
    from mlra_mega.train.run import train

    clock = StepClock()

    class Tick(Callback):
        def on_step_end(self, trainer, metrics) -> None:
            clock.tick()

    train(_config(model, steps, work / "run", extra), [Tick()], log=lambda s: None)
    return clock.times


def worker_bare(model: str, steps: int, work: Path, in_memory: bool) -> list[float]:
    import deepspeed
    import torch

    from mlra_mega import distributed
    from mlra_mega.data.datasets import SampleOrder, TrainBatches, build_datasets
    from mlra_mega.data.tokenizer import load_tokenizer
    from mlra_mega.model.build import build_model

    cfg = _resolved(_config(model, steps, work / "run", []))
    ctx = distributed.setup(cfg.parallel, cfg.train.seed)
    net = build_model(cfg.model, tensor_parallel=ctx.tp_size)
    t = cfg.train
    ds_config = {"train_batch_size": t.global_batch_size, "train_micro_batch_size_per_gpu": t.micro_batch_size,
                 "gradient_accumulation_steps": t.global_batch_size // (t.micro_batch_size * ctx.dp_size),
                 "gradient_clipping": cfg.optim.clip_grad, "zero_optimization": {"stage": cfg.zero.stage},
                 "zero_allow_untested_optimizer": True, "steps_per_print": 10**9}
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.optim.lr, betas=cfg.optim.betas, eps=cfg.optim.eps,
                            weight_decay=cfg.optim.weight_decay)
    engine, _, _, _ = deepspeed.initialize(model=net, optimizer=opt, config=ds_config, dist_init_required=False)
    accum = ds_config["gradient_accumulation_steps"]
    seq = cfg.model.seq_length
    positions = torch.arange(seq).unsqueeze(0).expand(t.micro_batch_size, seq)
    if in_memory:
        gen = torch.Generator().manual_seed(0)
        data = torch.randint(0, cfg.model.vocab_size, (steps * accum, t.micro_batch_size, seq + 1), generator=gen)
        micro_batches = ([(data[s * accum + m, :, :-1], data[s * accum + m, :, 1:]) for m in range(accum)]
                         for s in range(steps))
    else:  # megatron-core's GPTDataset over the same corpus, as the trainer reads it
        train_set = build_datasets(cfg.data, seq, load_tokenizer(cfg.data.tokenizer), cfg.train.seed).train
        batches = TrainBatches(train_set, SampleOrder(len(train_set), cfg.train.seed),
                               global_batch_size=t.global_batch_size, micro_batch_size=t.micro_batch_size,
                               dp_rank=ctx.dp_rank, dp_size=ctx.dp_size)
        micro_batches = ([(b["tokens"], b["labels"]) for b in batches.next_global_batch()] for _ in range(steps))
    clock = StepClock()
    for micro in micro_batches:
        for tokens, labels in micro:
            loss = engine(tokens, positions, None, labels=labels).float().mean()
            engine.backward(loss)
            engine.step()
        loss.item()
        clock.tick()
    distributed.teardown()
    return clock.times


def worker_hf(model: str, steps: int, work: Path) -> list[float]:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = _resolved(_config(model, steps, work / "run", []))
    m, t = cfg.model, cfg.train
    torch.manual_seed(cfg.train.seed)
    net = GPT2LMHeadModel(GPT2Config(
        vocab_size=m.padded_vocab_size, n_positions=m.seq_length, n_embd=m.hidden_size, n_layer=m.num_layers,
        n_head=m.num_heads, n_inner=m.ffn_size, resid_pdrop=m.hidden_dropout, embd_pdrop=m.hidden_dropout,
        attn_pdrop=m.attention_dropout, layer_norm_epsilon=m.layernorm_eps, tie_word_embeddings=m.tied_embeddings,
        attn_implementation="sdpa"))
    net.train()
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.optim.lr, betas=cfg.optim.betas, eps=cfg.optim.eps,
                            weight_decay=cfg.optim.weight_decay)
    accum = t.global_batch_size // t.micro_batch_size
    gen = torch.Generator().manual_seed(0)
    data = torch.randint(0, m.vocab_size, (steps * accum, t.micro_batch_size, m.seq_length), generator=gen)
    clock = StepClock()
    for step in range(steps):
        for i in range(accum):
            batch = data[step * accum + i]
            loss = net(input_ids=batch, labels=batch).loss / accum
            loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), cfg.optim.clip_grad)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss.item()
        clock.tick()
    return clock.times


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="quickstart")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--warmup", type=int, default=10, help="steps of each repetition left out")
    ap.add_argument("--out", default=None, help="JSON file (default bench/results/overhead-MODEL.json)")
    ap.add_argument("--only", nargs="+", choices=CONTESTANTS, default=list(CONTESTANTS),
                    help="contestants to run (bare is always among them: it is the reference)")
    ap.add_argument("--worker", choices=CONTESTANTS, help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.worker:
        work = Path(tempfile.mkdtemp(prefix=f"bench-{args.worker}-"))
        if args.worker in EXTRA:
            times = worker_ours(args.model, args.steps, work, EXTRA[args.worker])
        elif args.worker.startswith("bare"):
            times = worker_bare(args.model, args.steps, work, in_memory=args.worker == "bare-in-memory")
        else:
            times = worker_hf(args.model, args.steps, work)
        Path(args.result).write_text(json.dumps({"step_times_s": times}))
        return 0

    model_overrides(args.model)  # data made once, before any timing
    work = Path(tempfile.mkdtemp(prefix="bench-overhead-"))
    chosen = [c for c in CONTESTANTS if c in args.only or c == "bare"]
    per_round: dict[str, list[float]] = {c: [] for c in chosen}
    for r in range(args.rounds):
        for c in chosen:
            res = run_worker(Path(__file__), 1, ["--worker", c, "--model", args.model, "--steps", str(args.steps)],
                             work / f"{c}-{r}.json")
            per_round[c].append(steady(res["step_times_s"], args.warmup))
            print(f"[overhead] round {r + 1}/{args.rounds} {c}: {1e3 * per_round[c][-1]:.2f} ms/step", flush=True)
    stats = {c: spread(v) for c, v in per_round.items()}
    bare = stats["bare"]["median"]
    # Each round's ratio to the bare loop of the same round: a slow spell hits both sides.
    paired = {c: spread([x / b for x, b in zip(v, per_round["bare"])]) for c, v in per_round.items()}
    rows = [[c, 1e3 * s["median"], 1e3 * s["min"], 1e3 * s["max"], s["median"] / bare, paired[c]["median"],
             paired[c]["min"], paired[c]["max"]] for c, s in stats.items()]
    print(table(["contestant", "step ms", "min", "max", "x bare", "paired x bare", "min", "max"], rows,
                title=f"framework overhead, model {args.model}, {args.rounds} rounds x {args.steps} steps "
                      f"(median after {args.warmup})"))
    ratio = paired["ours"]["median"] if "ours" in paired else None
    print(", ".join(f"{c} / bare = {s['median']:.3f}" for c, s in paired.items() if c != "bare")
          + " (medians of the paired ratios; goal: ours <= 1.03)")
    write_json(args.out or RESULTS / f"overhead-{args.model}.json",
               {"model": args.model, "rounds": args.rounds, "steps": args.steps, "warmup": args.warmup,
                "per_round_s": per_round, "stats_s": stats, "paired_ratio_to_bare": paired,
                "ours_over_bare": ratio, "goal": 1.03})
    return 0


if __name__ == "__main__":
    sys.exit(main())
