"""A short training smoke run of what exists: model build, CPU shims, TEV, on synthetic tokens.

This stands in for the quickstart until the DeepSpeed trainer and the data pipeline land: one
process (or one tensor-parallel group), plain torch AdamW, a synthetic corpus of arithmetic
token sequences a tiny model can learn, and a line per step with loss and TEV.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from mlra_mega import distributed
from mlra_mega.config import RunConfig
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


def run_smoke(cfg: RunConfig, log: Callable[[str], None] = print) -> SmokeResult:
    from megatron.core import parallel_state

    ctx = distributed.setup(cfg.parallel, cfg.train.seed)
    try:
        if ctx.dp_size != 1:
            raise ConfigError("parallel.tensor", f"the smoke run has no data parallelism (world {ctx.world_size})",
                              "launch exactly parallel.tensor processes")
        m, t = cfg.model, cfg.train
        model = build_model(m, tensor_parallel=ctx.tp_size)
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr, betas=cfg.optim.betas,
                                eps=cfg.optim.eps, weight_decay=cfg.optim.weight_decay)
        positions = torch.arange(m.seq_length).unsqueeze(0).expand(t.micro_batch_size, -1)
        embedding = model.embedding.word_embeddings.weight
        tp_group = parallel_state.get_tensor_model_parallel_group()
        start = time.perf_counter()
        first = loss_value = float("nan")
        tev = compute_tev(embedding, m.vocab_size, tp_group)
        for step in range(1, t.steps + 1):
            tokens = synthetic_batch(step, t.micro_batch_size, m.seq_length, m.vocab_size, t.seed)
            loss = model(tokens[:, :-1], positions, None, labels=tokens[:, 1:]).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.optim.clip_grad > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.clip_grad)
            opt.step()
            loss_value = loss.item()
            first = loss_value if step == 1 else first
            if cfg.metrics.tev_interval and step % cfg.metrics.tev_interval == 0:
                tev = compute_tev(embedding, m.vocab_size, tp_group)
            if ctx.is_main and (step % t.log_interval == 0 or step == t.steps):
                log(f"step {step:>5}/{t.steps}  loss {loss_value:.4f}  "
                    f"tev {tev.mean:.5f} +- {tev.std:.5f}  {time.perf_counter() - start:6.1f}s")
        return SmokeResult(t.steps, first, loss_value, tev.mean, tev.std, time.perf_counter() - start)
    finally:
        distributed.teardown()
