"""Stability statistics: per-layer norms, residual-stream variance, loss spikes, gradient variance.

Everything here is exact under tensor parallelism: a TP-sharded tensor contributes its shard's
sum of squares on every TP rank, a replicated one only on TP rank 0, and one all-reduce gives
the whole model's value, so a TP=2 run reports what the gathered model would.

- Per-layer norms: parameters grouped by layer (`embedding`, `layer_00` ..., `final_norm`,
  `output`), 2-norm of each group.
- Residual-stream variance (PAPER.md section 2, "variance argument"): the population variance of
  every element of the hidden states after the embedding (`layer_00`) and after each transformer
  layer (`layer_01` ...), over the tokens of one global batch.
- Loss spikes: z = (loss - mean) / std over a trailing window of steps; a spike is z > threshold.
- Gradient variance across the micro-batches of one step (the quantity TEV stands in for):
  mean over micro-batches m of ||g_m - mean g||^2 / numel = (mean_m ||g_m||^2 - ||mean g||^2) / numel.
"""

from __future__ import annotations

import math
import re
from collections import deque
from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["SpikeDetector", "grad_variance", "group_of", "moments", "norms_by_group", "spearman",
           "sum_of_squares", "variance_from_moments"]

_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def group_of(name: str) -> str:
    """The layer group a parameter name belongs to."""
    m = _LAYER.search(name)
    if m:
        return f"layer_{int(m.group(1)):02d}"
    if name.startswith("embedding"):
        return "embedding"
    if "final_layernorm" in name:
        return "final_norm"
    return "output"


def sum_of_squares(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().double().pow(2).sum()


def norms_by_group(named: Iterable[tuple[str, torch.Tensor, bool]], tp_rank: int,
                   tp_group: dist.ProcessGroup | None) -> dict[str, float]:
    """{group: 2-norm} of (name, this rank's tensor, is TP-sharded) triples, exact across TP."""
    sums: dict[str, torch.Tensor] = {}
    for name, tensor, sharded in named:
        g = group_of(name)
        part = sum_of_squares(tensor) if (sharded or tp_rank == 0) else torch.zeros((), dtype=torch.float64)
        sums[g] = sums.get(g, torch.zeros((), dtype=torch.float64)) + part.cpu()
    keys = sorted(sums)
    if not keys:
        return {}
    stacked = torch.stack([sums[k] for k in keys])
    if tp_group is not None and dist.get_world_size(tp_group) > 1:
        dist.all_reduce(stacked, group=tp_group)
    return {k: float(v.sqrt()) for k, v in zip(keys, stacked)}


def moments(x: torch.Tensor) -> torch.Tensor:
    """(sum, sum of squares, count) of every element, in float64."""
    x = x.detach().double()
    return torch.stack([x.sum(), x.pow(2).sum(), torch.tensor(float(x.numel()), dtype=torch.float64,
                                                               device=x.device)])


def variance_from_moments(m: torch.Tensor) -> float:
    total, squares, count = (float(v) for v in m)
    mean = total / count
    return squares / count - mean * mean


def grad_variance(sum_sq_per_micro: float, n_micro: int, sq_norm_of_mean: float, numel: int) -> float:
    """mean_m ||g_m - g_bar||^2 / numel from sum_m ||g_m||^2, the count, ||g_bar||^2 and numel."""
    if n_micro < 2:
        raise ValueError("gradient variance needs at least two micro-batches")
    return (sum_sq_per_micro / n_micro - sq_norm_of_mean) / numel


class SpikeDetector:
    """Loss z-score against the trailing `window` steps; a spike when z > `threshold` (once the
    window holds at least `min_history` steps)."""

    def __init__(self, window: int = 100, threshold: float = 6.0, min_history: int = 20) -> None:
        self.threshold, self.min_history = threshold, min_history
        self.history: deque[float] = deque(maxlen=window)
        self.spikes = 0

    def update(self, loss: float) -> float | None:
        """The step's z-score (None while the window fills); counts a spike."""
        score = None
        finite = [x for x in self.history if math.isfinite(x)]
        if len(finite) >= self.min_history and math.isfinite(loss):
            mean = sum(finite) / len(finite)
            std = math.sqrt(sum((x - mean) ** 2 for x in finite) / len(finite))
            score = (loss - mean) / std if std > 0 else 0.0
            if score > self.threshold:
                self.spikes += 1
        self.history.append(loss)
        return score

    def state_dict(self) -> dict[str, Any]:
        return {"history": list(self.history), "spikes": self.spikes}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history.clear()
        self.history.extend(state.get("history", []))
        self.spikes = int(state.get("spikes", 0))


def spearman(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Spearman's rank correlation (None for fewer than 3 pairs or a constant series)."""
    from scipy.stats import spearmanr

    if len(x) < 3 or len(set(x)) < 2 or len(set(y)) < 2:
        return None
    return float(spearmanr(x, y).statistic)
