"""A short training smoke run of what exists: data pipeline, model build, CPU shims, TEV.

This stands in for the trainer until the DeepSpeed engine lands: one process (or one
tensor-parallel group), plain torch AdamW with gradient accumulation over the micro-batches,
a line per step with loss and TEV. Batches come from `data.paths` through the data pipeline,
or, with no data configured, from a synthetic corpus of arithmetic token sequences.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from mlra_mega import distributed
from mlra_mega.config import RunConfig
from mlra_mega.data.datasets import SampleOrder, TrainBatches, build_datasets
from mlra_mega.data.tokenizer import check_vocab, load_tokenizer
from mlra_mega.errors import ConfigError
from mlra_mega.metrics.tev import compute_tev
from mlra_mega.model.build import build_model

__all__ = ["SmokeResult", "synthetic_batch", "run_smoke"]


@dataclass(frozen=True)
class SmokeResult:
    steps: int
    first_loss: float
    final_loss: float
    tev_mean: float
    tev_std: float
    seconds: float

    @property
    def final_perplexity(self) -> float:
        return math.exp(self.final_loss)


def synthetic_batch(step: int, batch: int, seq: int, vocab: int, seed: int) -> torch.Tensor:
    """Sequences t_k = (a + b*k) mod V with per-sample random a, b: learnable, deterministic."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    a = torch.randint(0, vocab, (batch, 1), generator=g)
    b = torch.randint(1, 8, (batch, 1), generator=g)
    return (a + b * torch.arange(seq + 1)) % vocab


def _batch_source(cfg: RunConfig, dp_rank: int, dp_size: int) -> tuple[RunConfig, Callable[[int], list[dict]]]:
    """(config with model.vocab_size resolved, step -> this rank's micro-batches)."""
    m, t = cfg.model, cfg.train
    if not cfg.data.paths:
        if m.vocab_size is None:
            raise ConfigError("model.vocab_size", "is not set and there is no data.tokenizer to take it from",
                              "set model.vocab_size, or configure data.tokenizer and data.paths")

        def synthetic(step: int) -> list[dict]:
            tokens = synthetic_batch(step, t.micro_batch_size, m.seq_length, m.vocab_size, t.seed)
            return [{"tokens": tokens[:, :-1], "labels": tokens[:, 1:], "loss_mask": torch.ones(tokens[:, 1:].shape)}]

        return cfg, synthetic
    if cfg.data.tokenizer is None:
        raise ConfigError("data.tokenizer", "is not set", "give the tokenizer directory that made data.paths")
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    vocab = check_vocab(m.vocab_size, tokenizer)
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(m, vocab_size=vocab))
    cfg.validate()
    seed = cfg.data.seed if cfg.data.seed is not None else t.seed
    train = build_datasets(cfg.data, m.seq_length, tokenizer, seed).train
    batches = TrainBatches(train, SampleOrder(len(train), seed), global_batch_size=t.global_batch_size,
                           micro_batch_size=t.micro_batch_size, dp_rank=dp_rank, dp_size=dp_size)
    return cfg, lambda step: batches.next_global_batch()


def run_smoke(cfg: RunConfig, log: Callable[[str], None] = print) -> SmokeResult:
    from megatron.core import parallel_state

    ctx = distributed.setup(cfg.parallel, cfg.train.seed)
    try:
        if ctx.dp_size != 1:
            raise ConfigError("parallel.tensor", f"the smoke run has no data parallelism (world {ctx.world_size})",
                              "launch exactly parallel.tensor processes")
        cfg, next_batches = _batch_source(cfg, ctx.dp_rank, ctx.dp_size)
        m, t = cfg.model, cfg.train
        model = build_model(m, tensor_parallel=ctx.tp_size)
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr, betas=cfg.optim.betas,
                                eps=cfg.optim.eps, weight_decay=cfg.optim.weight_decay)
        embedding = model.embedding.word_embeddings.weight
        tp_group = parallel_state.get_tensor_model_parallel_group()
        start = time.perf_counter()
        first = loss_value = float("nan")
        tev = compute_tev(embedding, m.vocab_size, tp_group)
        for step in range(1, t.steps + 1):
            micro = next_batches(step)
            opt.zero_grad(set_to_none=True)
            total = 0.0
            for batch in micro:
                positions = torch.arange(batch["tokens"].shape[1]).unsqueeze(0).expand_as(batch["tokens"])
                per_token = model(batch["tokens"], positions, None, labels=batch["labels"])
                mask = batch["loss_mask"].float()
                loss = (per_token * mask).sum() / mask.sum()
                (loss / len(micro)).backward()
                total += loss.item() / len(micro)
            if cfg.optim.clip_grad > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.clip_grad)
            opt.step()
            loss_value = total
            first = loss_value if step == 1 else first
            if cfg.metrics.tev_interval and step % cfg.metrics.tev_interval == 0:
                tev = compute_tev(embedding, m.vocab_size, tp_group)
            if ctx.is_main and (step % t.log_interval == 0 or step == t.steps):
                log(f"step {step:>5}/{t.steps}  loss {loss_value:.4f}  "
                    f"tev {tev.mean:.5f} +- {tev.std:.5f}  {time.perf_counter() - start:6.1f}s")
        return SmokeResult(t.steps, first, loss_value, tev.mean, tev.std, time.perf_counter() - start)
    finally:
        distributed.teardown()
