"""What a layout must communicate per step, from the model's shape: bytes sent by one rank (rank 0:
the first pipeline stage, TP rank 0, DP rank 0) and calls, per process group.

Bytes follow `comm.ledger`'s convention (what a rank sends under ring algorithms: 2 (n-1)/n of an
all-reduce's buffer, (n-1)/n of an all-gather's output or a reduce-scatter's input, a send's
tensor). The terms, for M micro-batches per data-parallel rank of T = micro-batch x sequence
tokens, activations A = T d bytes-per-element, on a stage of L layers:

- tp: without sequence parallelism, per micro-batch, an all-reduce of A after each row-parallel
  layer in the forward (attention output, MLP output; the embedding's on the first stage) and of
  each column-parallel layer's input gradient in the backward (attention input, once per
  projection module; MLP input; the output layer's on the last stage); with it, all-gathers and
  reduce-scatters of A in their place (forward: a gather before each column-parallel module, a
  scatter after each row-parallel; backward: a gather of each row-parallel's output gradient and
  of each column-parallel's input again for its weight gradient, a scatter of each column-
  parallel's input gradient; the embedding's scatter and its gradient's gather; the output
  layer's gathers and scatter), and the sequence-parallel parameters' gradients (norms,
  row-parallel biases) in one all-reduce per step; the vocabulary-parallel cross-entropy's three
  all-reduces of T fp32 values on the last stage; TEV's three float64 sums; at ZeRO-0 our
  gradient norm's float64.
- dp: the gradients' reduction and the parameters' gathers of the rank's P parameters: ZeRO-0 an
  all-reduce of P; ZeRO-1 and 2 a reduce-scatter of P and an all-gather of the updated P; ZeRO-3
  per micro-batch an all-gather of P in the forward and again in the backward and a
  reduce-scatter of P; the loss's float64 mean; at ZeRO 1-3 DeepSpeed's gradient norm and
  overflow flag (fp32 all-reduces over the partitions).
- pp: the first stage sends each micro-batch's activations A to the next and receives their
  gradients (counted where they are sent); the loss and TEV are broadcast from the stage that
  has them (float64s).
- embedding: with tied embeddings over PP > 1, the word embedding's gradient all-reduced between
  the first and last stage.
- mp (TP x PP): DeepSpeed's gradient norm and overflow flag at ZeRO 1-2 (two fp32 all-reduces);
  at ZeRO-3 its gradient norm, summed in float64, twice.
- world: the non-finite agreement's int32 per rank.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from mlra_mega.config import RunConfig, pipeline_split

__all__ = ["Expected", "expected_step", "sequence_parallel_numel"]


@dataclass(frozen=True)
class Expected:
    bytes: float  # sent by the rank per step
    calls: int | None  # None where the count is the library's choice (DeepSpeed's buckets)


def _ring(n: int, buffer: float, all_reduce: bool = False) -> float:
    share = (n - 1) / n * buffer
    return 2 * share if all_reduce else share


def sequence_parallel_numel(cfg: RunConfig, layers: int, first: bool, last: bool) -> int:
    """Elements of the parameters whose gradients sequence parallelism leaves partial over TP:
    the norms (and Embed LN's) and the row-parallel biases, on a stage of `layers` layers."""
    m = cfg.model
    d = m.hidden_size
    norm = d if m.arch == "llama" else 2 * d
    biases = 0 if m.arch == "llama" else 2 * d  # attention output projection, MLP output
    n = layers * (2 * norm + biases)
    if last:
        n += norm
    if first and m.embedding == "layernorm":
        n += 2 * d
    return n


def expected_step(cfg: RunConfig, *, tp: int, pp: int, dp: int, zero: int, params: int,
                  stage: int = 0, tev: bool = True) -> dict[str, Expected]:
    """Per process group, what rank (TP 0, DP 0) of `stage` sends in a step (one where TEV is
    computed, unless `tev` is false; without the stability diagnostics' own reductions);
    `params` is the number of parameters that rank holds (its TP shard of its stage)."""
    m, t = cfg.model, cfg.train
    e = 2 if t.precision == "bf16" else 4
    micro = t.global_batch_size // (t.micro_batch_size * dp)
    tokens = t.micro_batch_size * m.seq_length
    act = tokens * m.hidden_size * e
    layers = pipeline_split(m.num_layers, pp, cfg.parallel.pipeline_layers if pp > 1 else None)[stage]
    first, last = stage == 0, stage == pp - 1
    sp = cfg.parallel.sequence_parallel
    out: dict[str, Expected] = {}
    tev_due = tev and bool(cfg.metrics.tev_interval)

    if tp > 1:
        factor = set(m.mlra.factorize) if m.attention == "mlra" else set()
        attn_modules = int(bool(factor & {"q", "k", "v"})) + int(bool({"q", "k", "v"} - factor)) if factor else 1
        col, row = layers * (attn_modules + 1), layers * 2  # column- and row-parallel modules of the stage
        if sp:
            gathers = col + row + col + int(first) + 2 * int(last)  # fwd inputs, bwd output grads, bwd wgrad inputs
            scatters = row + col + int(first) + int(last)
            per_micro = (gathers + scatters) * _ring(tp, act)
            calls = micro * (gathers + scatters)
            sp_numel = sequence_parallel_numel(cfg, layers, first, last)
            per_step = _ring(tp, sp_numel * 4, all_reduce=True)  # one coalesced all-reduce of the partial grads
            calls += 1
        else:
            reduces = row + col + int(first) + int(last)
            per_micro = reduces * _ring(tp, act, all_reduce=True)
            calls = micro * reduces
            per_step = 0.0
        if last:
            per_micro += 3 * _ring(tp, tokens * 4, all_reduce=True)
            calls += 3 * micro
        if tev_due and first:
            per_step += _ring(tp, 3 * 8, all_reduce=True)
            calls += 1
        if zero == 0:
            per_step += _ring(tp, 8, all_reduce=True)
            calls += 1
        out["tp"] = Expected(micro * per_micro + per_step, calls)

    if dp > 1:
        grads = params * e
        if zero == 0:
            sent = _ring(dp, grads, all_reduce=True)
        elif zero in (1, 2):
            sent = _ring(dp, grads) + _ring(dp, params * e)
        else:
            sent = micro * (2 * _ring(dp, params * e) + _ring(dp, grads))
        sent += _ring(dp, 8, all_reduce=True)  # the loss's mean
        if zero in (1, 2, 3):  # DeepSpeed's gradient norm and overflow flag over its partitions
            sent += 2 * _ring(dp, 4, all_reduce=True)
        out["dp"] = Expected(sent, None)

    if pp > 1:
        sends = micro * (int(not last) + int(not first))  # activations forward, gradients backward
        receives = sends
        broadcasts = 1 + int(tev_due)
        sent = micro * act * int(not last) + micro * act * int(not first)
        sent += _ring(pp, 8) + (_ring(pp, 16) if tev_due else 0.0)
        out["pp"] = Expected(sent, sends + receives + broadcasts)
        if m.tied_embeddings and (first or last):
            rows = math.ceil(m.padded_vocab_size / tp)
            out["embedding"] = Expected(_ring(2, rows * m.hidden_size * e, all_reduce=True), 1)

    if tp * pp > 1 and zero in (1, 2):
        out["mp"] = Expected(2 * _ring(tp * pp, 4, all_reduce=True), 2)
    elif tp * pp > 1 and zero == 3:  # ZeRO-3 sums its gradient norm over TP in float64, twice a step
        out["mp"] = Expected(2 * _ring(tp * pp, 8, all_reduce=True), 2)

    world = tp * pp * dp
    if world > 1:
        out["world"] = Expected(_ring(world, world * 4, all_reduce=True), 1)
    return out
