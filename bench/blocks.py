"""GPT-2 blocks against Llama-style blocks (RMSNorm, SwiGLU, rotary, no biases, untied): step time,
parameters and activations, each with MHA and MLRA, and Llama's grouped-query attention.

Same width, depth, heads and sequence for every row (the "mid" model by default: d 256, 4 heads of
64, 4 layers, seq 128); the MLP widths are each block type's default (GPT-2 4d, Llama 8/3 d
rounded up to 256: three matrices instead of two). Parameters are the model's total, activations
what autograd saves in one micro-batch's forward on rank 0.

    python bench/blocks.py [--model mid] [--rounds 3] [--steps 40]
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import arguments, measure, model_overrides, record, table, write_json


def main() -> int:
    args = arguments(__doc__, "blocks", steps=40, warmup=8).parse_args()

    from mlra_mega.config import load_config

    base = model_overrides(args.model)
    shape = load_config(overrides=[o for o in base if o.startswith("model.")]).model
    kv = max(1, shape.num_heads // 2)
    variants = {
        "gpt2 MHA": ["model.arch=gpt2", "model.attention=mha"],
        "gpt2 MLRA": ["model.arch=gpt2", "model.attention=mlra"],
        "llama MHA": ["model.arch=llama", "model.attention=mha"],
        "llama MLRA": ["model.arch=llama", "model.attention=mlra"],
        f"llama GQA kv{kv}": ["model.arch=llama", "model.attention=mha", f"model.num_kv_heads={kv}"],
        f"llama MLRA kv{kv}": ["model.arch=llama", "model.attention=mlra", f"model.num_kv_heads={kv}"],
    }
    contestants = {name: (1, [*base, *extra, f"train.steps={args.steps}", "metrics.tev_interval=1"])
                   for name, extra in variants.items()}
    results = measure(contestants, args.rounds, args.warmup, Path(tempfile.mkdtemp(prefix="bench-blocks-")),
                      tag="blocks")
    ref = results["gpt2 MHA"]["step_s"]["median"]
    tokens = results["gpt2 MHA"]["last"]["tokens_per_step"]
    rows = []
    for name, r in results.items():
        rank0 = r["last"]["ranks"][0]
        rows.append([name, 1e3 * r["step_s"]["median"], r["step_s"]["range_pct"], r["step_s"]["median"] / ref,
                     tokens / r["step_s"]["median"], r["last"]["parameters"] / 1e6, rank0["activation_bytes"] / 2**20])
    print(table(["block, attention", "step ms", "range %", "x gpt2 MHA", "tokens/s", "params M", "activations MiB"],
                rows, title=f"GPT-2 vs Llama blocks, model {args.model} (d {shape.hidden_size}, {shape.num_heads} heads, "
                            f"{shape.num_layers} layers), {args.rounds} rounds x {args.steps} steps "
                            f"(median after {args.warmup})"))
    write_json(args.out, {"model": args.model, "rounds": args.rounds, "steps": args.steps, "warmup": args.warmup,
                          "results": record(results)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
