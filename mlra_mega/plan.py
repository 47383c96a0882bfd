"""`mlra-mega plan`: every layout of a config on N GPUs, its memory per GPU and pipeline bubble.

A layout is tensor x pipeline x data parallelism (TP within a node), a ZeRO stage (1 with
pipeline stages) and a recompute mode. For each, per GPU of the worst stage (bytes):

- parameters: the stage's parameters on one TP rank (`stage_numel`: column-/row-parallel
  weights, vocab-parallel embedding and output split by TP; norms, row-parallel biases and
  position embeddings whole; the last stage's copy of a tied matrix at PP > 1), divided by DP
  at ZeRO-3;
- gradients: as many, in the parameters' dtype, divided by DP at ZeRO-2/3 (not where they are
  reduced once per step in DeepSpeed's coalescing window, `zero.coalesce_reduction`: whole until then);
- optimizer state: AdamW's two moments and DeepSpeed's fp32 master partition, 12 bytes per
  parameter divided by DP (ZeRO 1-3; a bf16 run at ZeRO-0 too, whose bf16 optimizer partitions
  the same way), 8 bytes per parameter unpartitioned at fp32 ZeRO-0 (torch's AdamW as is);
- activations: what one micro-batch saves for backward on the stage (per layer, in elements of
  s x b: 4h whole and 4h + 2f + a s sharded over TP, plus MLRA's low-rank intermediates; the
  attention scores a s dropped by selective recompute; only the layer input h with full
  recompute, plus one layer's working set while it is recomputed; the last stage's final norm
  and its vocabulary-parallel logits), times the micro-batches in flight: min(PP - stage, m)
  under 1F1B, one without pipelining.

The bubble of 1F1B with m micro-batches per step over P stages is (P - 1) / (m + P - 1).
Layouts are ranked among those that fit by a rough speed score: less bubble, less
recomputation (full recompute about 33% more compute, selective about 3%), less TP
communication, ZeRO-3's extra gathers last. bench/plan_check.py measures these bytes on CPU.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from mlra_mega.config import ConfigError, RunConfig, coalesced_reduction, pipeline_split

__all__ = ["Layout", "Estimate", "stage_numel", "layer_activation_bytes", "activation_bytes", "estimate", "layouts", "plan", "format_plan"]

GIB = 2**30


@dataclass(frozen=True)
class Layout:
    tp: int
    pp: int
    dp: int
    zero: int
    recompute: str

    def name(self) -> str:
        return f"TP{self.tp} x PP{self.pp} x DP{self.dp} ZeRO-{self.zero} {self.recompute}"


@dataclass(frozen=True)
class Estimate:
    layout: Layout
    params: float  # bytes per GPU, worst stage
    grads: float
    optimizer: float
    activations: float
    bubble: float
    micro_batches: int  # per step and data-parallel rank

    @property
    def total(self) -> float:
        return self.params + self.grads + self.optimizer + self.activations


def _layer_numel(cfg: RunConfig) -> tuple[int, int]:
    """(TP-sharded, whole) parameters of one transformer layer at TP = 1."""
    m = cfg.model
    d, f, dh, r = m.hidden_size, m.ffn_size, m.head_dim, m.mlra_rank
    heads = {"q": m.num_heads, "k": m.kv_heads, "v": m.kv_heads}
    bias = m.arch == "gpt2"
    if bias:
        sharded = d * f + f + f * d  # MLP: fc1 weight and bias, fc2 weight
        whole = 4 * d + d  # two LayerNorms, fc2 bias
    else:
        sharded = 3 * d * f  # SwiGLU: gate, up, down
        whole = 2 * d  # two RMSNorms
    factor = set(m.mlra.factorize) if m.attention == "mlra" else set()
    for p, n in heads.items():
        if p in factor:
            sharded += d * n * r + n * r * dh + bias * n * dh  # A, per-head B (with its bias)
        else:
            sharded += d * n * dh + bias * n * dh
    h = m.num_heads
    if "o" in factor:
        sharded += h * dh * r + h * r * d  # per-head A^O, row-parallel B^O
    else:
        sharded += h * dh * d
    whole += bias * d  # the output projection's bias
    return sharded, whole


def stage_numel(cfg: RunConfig, tp: int, pp: int, stage: int) -> tuple[int, int]:
    """(transformer-layer parameters, the rest) on one TP rank of `stage`."""
    m = cfg.model
    d, v = m.hidden_size, m.padded_vocab_size
    split = pipeline_split(m.num_layers, pp, cfg.parallel.pipeline_layers if pp > 1 else None)
    sharded, whole = _layer_numel(cfg)
    layers = split[stage] * (sharded // tp + whole)
    other = 0
    if stage == 0:
        other += v * d // tp + (m.max_positions * d if m.learned_positions else 0)
        other += 2 * d if m.embedding == "layernorm" else 0
    if stage == pp - 1:
        other += 2 * d if m.arch == "gpt2" else d  # the final LayerNorm / RMSNorm
        if not m.tied_embeddings or pp > 1:
            other += v * d // tp
    return layers, other


def layer_activation_bytes(cfg: RunConfig, tp: int, recompute: str, sequence_parallel: bool = False,
                           micro_batch: int | None = None) -> float:
    """Bytes one transformer layer saves for backward for one micro-batch (one TP rank)."""
    m = cfg.model
    b = micro_batch or cfg.train.micro_batch_size
    s, d, f, a, r = m.seq_length, m.hidden_size, m.ffn_size, m.num_heads, m.mlra_rank
    e = 2 if cfg.train.precision == "bf16" else 4
    sb = s * b
    whole_t = tp if sequence_parallel else 1
    factor = set(m.mlra.factorize) if m.attention == "mlra" else set()
    low_rank = len(factor & {"q", "k", "v"}) * a * r + (a * r if "o" in factor else 0)
    scores = a * s
    if recompute == "full":
        return e * sb * d / whole_t
    if m.arch == "llama":
        # Measured on the built layer (tests/test_plan.py): q, k and v as projected, rotated and
        # their rotate-half halves (4 d + 4 kv widths); SwiGLU keeps [gate; up], silu(gate),
        # up + 0 (megatron's glu_linear_offset) and the product (5 f); RMSNorm one fp32 statistic
        # per token; the rotary cos / sin tables of q and k (4 s d_head, whatever the batch).
        kv = m.kv_heads * m.head_dim
        stats = 2 * sb * 4 / whole_t
        rope = 4 * s * m.head_dim * 4
        full = e * sb * (4 * d / whole_t + (4 * d + 4 * kv + 5 * f + scores + low_rank) / tp) + stats + rope
    else:
        stats = 2 * 2 * sb * 4 / whole_t  # two LayerNorms' mean and rstd, fp32
        full = e * sb * (4 * d / whole_t + (4 * d + 2 * f + scores + low_rank) / tp) + stats
    return full - e * sb * scores / tp if recompute == "selective" else full


def activation_bytes(cfg: RunConfig, tp: int, pp: int, stage: int, recompute: str, sequence_parallel: bool = False,
                     micro_batch: int | None = None) -> float:
    """Bytes one micro-batch saves for backward on `stage` (one TP rank)."""
    m = cfg.model
    b = micro_batch or cfg.train.micro_batch_size
    e = 2 if cfg.train.precision == "bf16" else 4
    sb = m.seq_length * b
    split = pipeline_split(m.num_layers, pp, cfg.parallel.pipeline_layers if pp > 1 else None)
    total = split[stage] * layer_activation_bytes(cfg, tp, recompute, sequence_parallel, micro_batch)
    if stage == 0 and m.embedding == "layernorm":  # Embed LN: its input and statistics
        total += (e * sb * m.hidden_size + 2 * sb * 4) / (tp if sequence_parallel else 1)
    if stage == pp - 1:  # final norm in and out, the logits of this rank's vocabulary shard
        total += e * sb * 2 * m.hidden_size / (tp if sequence_parallel else 1) + e * sb * m.padded_vocab_size / tp
        if m.arch == "llama":  # the final RMSNorm also keeps its normalised input; the rotary table
            total += e * sb * m.hidden_size / (tp if sequence_parallel else 1) + 4 * m.seq_length * m.head_dim
    return total


def _in_flight(pp: int, stage: int, micro_batches: int) -> int:
    return min(pp - stage, micro_batches) if pp > 1 else 1


def estimate(cfg: RunConfig, layout: Layout) -> Estimate:
    t = cfg.train
    micro_batches = t.global_batch_size // (t.micro_batch_size * layout.dp)
    pb = 2 if t.precision == "bf16" else 4
    worst = None
    for stage in range(layout.pp):
        layers, other = stage_numel(cfg, layout.tp, layout.pp, stage)
        n = layers + other
        params = pb * n / (layout.dp if layout.zero == 3 else 1)
        sp = cfg.parallel.sequence_parallel and layout.tp > 1
        # In DeepSpeed's coalescing window the gradients stay whole on each rank until the step's reduction.
        partitioned = layout.zero >= 2 and not coalesced_reduction(cfg.zero.coalesce_reduction, layout.zero, sp)
        grads = pb * n / (layout.dp if partitioned else 1)
        if layout.zero == 0 and t.precision != "bf16":
            optimizer = 8.0 * n
        else:
            optimizer = 12.0 * n / layout.dp
        acts = activation_bytes(cfg, layout.tp, layout.pp, stage, layout.recompute, sp) * _in_flight(
            layout.pp, stage, micro_batches)
        if layout.recompute == "full":  # one layer's activations while it is recomputed
            acts += layer_activation_bytes(cfg, layout.tp, "none", sp)
        e = Estimate(layout, params, grads, optimizer, acts, 0.0, micro_batches)
        if worst is None or e.total > worst.total:
            worst = e
    bubble = (layout.pp - 1) / (micro_batches + layout.pp - 1)
    return Estimate(layout, worst.params, worst.grads, worst.optimizer, worst.activations, bubble, micro_batches)


def _divisors(n: int) -> list[int]:
    return [k for k in range(1, n + 1) if n % k == 0]


def layouts(cfg: RunConfig, gpus: int, gpus_per_node: int) -> list[Layout]:
    """Every layout of `cfg` on `gpus` GPUs that the framework accepts."""
    m, t = cfg.model, cfg.train
    out = []
    for tp in _divisors(gpus_per_node):
        if gpus % tp or m.num_heads % tp or m.padded_vocab_size % tp:
            continue
        for pp in _divisors(gpus // tp):
            if pp > m.num_layers:
                continue
            try:
                pipeline_split(m.num_layers, pp, cfg.parallel.pipeline_layers if pp > 1 else None)
            except ConfigError:
                continue
            dp = gpus // (tp * pp)
            if t.global_batch_size % (t.micro_batch_size * dp):
                continue
            for zero in ((1,) if pp > 1 else (0, 1, 2, 3)):
                for recompute in ("none", "selective", "full"):
                    out.append(Layout(tp, pp, dp, zero, recompute))
    return out


def _speed(e: Estimate) -> float:
    lay = e.layout
    recompute = {"none": 1.0, "selective": 0.97, "full": 0.75}[lay.recompute]
    zero = {0: 1.0, 1: 1.0, 2: 0.99, 3: 0.9}[lay.zero]
    return (1 - e.bubble) * recompute * zero * (1 - 0.04 * math.log2(lay.tp))


def plan(cfg: RunConfig, gpus: int, gpu_memory_gib: float, gpus_per_node: int) -> list[tuple[Estimate, bool]]:
    """(estimate, fits) for every layout; those that fit first, fastest first."""
    if gpus < 1 or gpus_per_node < 1 or gpu_memory_gib <= 0:
        raise ConfigError("plan", f"--gpus {gpus}, --gpus-per-node {gpus_per_node}, --gpu-memory {gpu_memory_gib}",
                          "give positive numbers")
    rows = [(e, e.total <= gpu_memory_gib * GIB) for e in map(lambda lay: estimate(cfg, lay),
                                                                 layouts(cfg, gpus, min(gpus, gpus_per_node)))]
    if not rows:
        raise ConfigError("plan", f"no layout of this config fits {gpus} GPU(s) ({gpus_per_node} per node): "
                          "train.global_batch_size must be a multiple of micro_batch_size x data-parallel size",
                          "change --gpus or train.global_batch_size / train.micro_batch_size")
    return sorted(rows, key=lambda row: (not row[1], -_speed(row[0]), row[0].total))


def format_plan(rows: list[tuple[Estimate, bool]], gpu_memory_gib: float, limit: int | None = None) -> str:
    def gib(x: float) -> str:
        return f"{x / GIB:.2f}"

    head = (f"{'rank':>4}  {'layout':<34} {'params':>7} {'grads':>7} {'optim':>7} {'activ':>7} {'total':>7} "
            f"{'bubble':>6}  fits {gpu_memory_gib:g} GiB")
    lines = [head, "-" * len(head)]
    for i, (e, fits) in enumerate(rows[:limit] if limit else rows, start=1):
        lines.append(f"{i:>4}  {e.layout.name():<34} {gib(e.params):>7} {gib(e.grads):>7} {gib(e.optimizer):>7} "
                     f"{gib(e.activations):>7} {gib(e.total):>7} {e.bubble:>6.2f}  {'yes' if fits else 'no'}")
    fitting = sum(f for _, f in rows)
    lines.append(f"{fitting} of {len(rows)} layouts fit (GiB per GPU of the fullest stage; activations of "
                 f"{rows[0][0].micro_batches if rows else 0} micro-batch(es) per step and DP rank at the top layout)")
    return "\n".join(lines)
