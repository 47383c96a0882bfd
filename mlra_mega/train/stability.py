"""Stability callbacks: per-layer norms, residual variance, loss spikes, gradient variance.

They run on every rank, record their values with `trainer.record_metric` (so metrics.jsonl and
MLflow get them), and keep their state across a resume. Each takes the `diagnostics` section.
The statistics themselves are in `mlra_mega.metrics.stability`.

- `LayerNorms` (every `diagnostics.interval` steps): pre-clip gradient norm and parameter norm
  per layer, `grad_norm/<group>`, `param_norm/<group>`. Gradients are read between the last
  backward and the optimizer with DeepSpeed's `safe_get_full_grad` (reduced, whole; ZeRO 0-3).
  With pipeline stages every stage measures its own layers under their global numbers and the
  stages' groups are gathered (a stage's copy of the tied matrix is not counted again).
- `ResidualProbe` (same interval): `resid_var/layer_00` (embedding output) .. `layer_L`, from
  forward hooks over the step's whole batch (every micro-batch, every data-parallel rank and
  pipeline stage), so every layout reports the same value.
- `SpikeMonitor` (every step): `loss_spike_score`, `loss_spikes` (count), `tev_jumps` (count of
  TEV means moving by more than `diagnostics.tev_jump` between measurements).
- `GradVariance` (every `diagnostics.grad_variance_interval` steps, ZeRO 0/1): `grad_var` and
  `grad_var_embedding`, the variance across the step's micro-batches (all data-parallel ranks'),
  and at the last step the Spearman correlations of TEV mean with the embedding one, raw and on
  first differences (`tev_gradvar_spearman`, `tev_gradvar_spearman_diff`).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from mlra_mega.config import DiagnosticsConfig
from mlra_mega.metrics.stability import (SpikeDetector, grad_variance, group_of, moments, norms_by_group, spearman,
                                         sum_of_squares, variance_from_moments)
from mlra_mega.metrics.tev import embedding_tev
from mlra_mega.model.pipeline import global_name, is_tied_copy, layer_offset
from mlra_mega.train.callbacks import Callback, Priority
from mlra_mega.zero import gathered

__all__ = ["GradVariance", "LayerNorms", "ResidualProbe", "SpikeMonitor", "stability_callbacks"]


def _sharded(p: torch.nn.Parameter) -> bool:
    return bool(getattr(p, "tensor_model_parallel", False))


def _stage_params(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    """(global name, parameter) of this stage, its copy of a tied matrix left out."""
    offset = layer_offset(model)
    return [(global_name(n, offset), p) for n, p in model.named_parameters() if not is_tied_copy(model, n)]


def _over_stages(norms: dict[str, float], ctx: Any) -> dict[str, float]:
    """Every stage's {group: norm} (their groups are disjoint), on every stage."""
    if ctx.pp_size == 1:
        return norms
    parts: list[Any] = [None] * ctx.pp_size
    dist.all_gather_object(parts, norms, group=ctx.pp_group)
    return {k: v for part in parts for k, v in part.items()}


def _full_grad(p: torch.nn.Parameter) -> torch.Tensor:
    from deepspeed.utils import safe_get_full_grad  # DeepSpeed is loaded: the engine is built

    g = safe_get_full_grad(p)
    return torch.zeros_like(p) if g is None else g


class LayerNorms(Callback):
    priority = Priority.DIAGNOSTICS
    name = "layer_norms"

    def __init__(self, diagnostics: DiagnosticsConfig) -> None:
        self.interval, self.layers = diagnostics.interval, diagnostics.layers
        self._grads: dict[str, float] = {}

    def _wanted(self, name: str) -> bool:
        group = group_of(name)
        return self.layers is None or not group.startswith("layer_") or int(group[6:]) in self.layers

    def on_before_optimizer_step(self, trainer: Any) -> None:
        if trainer.step % self.interval:
            return
        ctx = trainer.ctx
        named = [(n, _full_grad(p), _sharded(p)) for n, p in _stage_params(trainer.model) if self._wanted(n)]
        self._grads = _over_stages(norms_by_group(named, ctx.tp_rank, ctx.tp_group), ctx)

    def on_step_end(self, trainer: Any, metrics: Any) -> None:
        if metrics.step % self.interval:
            return
        ctx = trainer.ctx
        params = [(n, p) for n, p in _stage_params(trainer.model) if self._wanted(n)]
        with gathered(p for _, p in params):
            norms = norms_by_group([(n, p, _sharded(p)) for n, p in params], ctx.tp_rank, ctx.tp_group)
        norms = _over_stages(norms, ctx)
        for k, v in self._grads.items():
            trainer.record_metric(f"stability/grad_norm/{k}", v)
        for k, v in norms.items():
            trainer.record_metric(f"stability/param_norm/{k}", v)


class ResidualProbe(Callback):
    priority = Priority.DIAGNOSTICS
    name = "residual_probe"

    def __init__(self, diagnostics: DiagnosticsConfig, sequence_parallel: bool) -> None:
        self.interval, self.layers = diagnostics.interval, diagnostics.layers
        self.sequence_parallel = sequence_parallel
        self._moments: dict[tuple[str, int], torch.Tensor] = {}
        self._micro = -1  # the micro-batch the forward is on: the model (stage) runs once per micro-batch
        self._trainer: Any = None
        self._handles: list[Any] = []
        self._keys: list[str] = []  # every stage's keys, in one order

    def _hook(self, key: str):
        def record(module: torch.nn.Module, args: Any, output: Any) -> None:
            t = self._trainer
            if not module.training or t.step % self.interval:  # not evaluation, not another step
                return
            if (key, self._micro) in self._moments:  # activation checkpointing's recomputation
                return
            hidden = output[0] if isinstance(output, tuple) else output
            tp_rank = t.ctx.tp_rank
            m = moments(hidden)
            # Without sequence parallelism every TP rank holds the same hidden states: count them once.
            self._moments[key, self._micro] = m if (self.sequence_parallel or tp_rank == 0) else torch.zeros_like(m)
        return record

    def _next_micro(self, module: torch.nn.Module, args: Any) -> None:
        self._micro += 1

    def on_fit_start(self, trainer: Any) -> None:
        self._trainer = trainer
        model = trainer.model
        # Recomputation re-runs layers, never the whole model: its forwards count micro-batches.
        self._handles = [model.register_forward_pre_hook(self._next_micro)]
        if getattr(model, "pre_process", True):
            self._handles.append(model.embedding.register_forward_hook(self._hook("layer_00")))
        offset = layer_offset(model)
        for i, layer in enumerate(model.decoder.layers, start=offset):
            if self.layers is None or i in self.layers:
                self._handles.append(layer.register_forward_hook(self._hook(f"layer_{i + 1:02d}")))
        layers = range(trainer.model_cfg.num_layers) if self.layers is None else self.layers
        self._keys = ["layer_00", *(f"layer_{i + 1:02d}" for i in sorted(layers))]

    def on_step_end(self, trainer: Any, metrics: Any) -> None:
        if metrics.step % self.interval:
            return
        keys = self._keys
        dev = trainer.ctx.device
        zero = torch.zeros(3, dtype=torch.float64, device=dev)
        stacked = torch.stack([sum((m.to(dev) for (k, _), m in self._moments.items() if k == key), zero)
                               for key in keys])
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(stacked)  # every micro-batch of every data-parallel rank: the whole batch
        for k, m in zip(keys, stacked.cpu()):
            trainer.record_metric(f"stability/resid_var/{k}", variance_from_moments(m))
        self._moments, self._micro = {}, -1

    def on_fit_end(self, trainer: Any) -> None:
        for h in self._handles:
            h.remove()


class SpikeMonitor(Callback):
    priority = Priority.DIAGNOSTICS
    name = "spike_monitor"

    def __init__(self, diagnostics: DiagnosticsConfig, log=print) -> None:
        d = diagnostics
        self.detector = SpikeDetector(d.spike_window, d.spike_threshold, d.spike_min_history)
        self.tev_jump, self.min_history, self.log = d.tev_jump, d.spike_min_history, log
        self.prev_tev: float | None = None
        self.tev_jumps = 0

    def on_step_end(self, trainer: Any, metrics: Any) -> None:
        before = self.detector.spikes
        score = self.detector.update(metrics.loss)
        if score is not None:
            trainer.record_metric("stability/loss_spike_score", score)
        if self.detector.spikes > before:
            self.log(f"[stability] loss spike at step {metrics.step}: loss {metrics.loss:.4f}, z = {score:.1f} "
                     f"({self.detector.spikes} in this run)")
        if metrics.tev_mean is not None:
            prev, self.prev_tev = self.prev_tev, metrics.tev_mean
            if prev and metrics.step > self.min_history and abs(metrics.tev_mean - prev) / prev > self.tev_jump:
                self.tev_jumps += 1
                self.log(f"[stability] TEV jump at step {metrics.step}: {prev:.5f} -> {metrics.tev_mean:.5f}")
        trainer.record_metric("stability/loss_spikes", self.detector.spikes)
        trainer.record_metric("tev/jumps", self.tev_jumps)

    def state_dict(self) -> dict[str, Any]:
        return {"detector": self.detector.state_dict(), "prev_tev": self.prev_tev, "tev_jumps": self.tev_jumps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.detector.load_state_dict(state.get("detector", {}))
        self.prev_tev, self.tev_jumps = state.get("prev_tev"), int(state.get("tev_jumps", 0))


class GradVariance(Callback):
    priority = Priority.DIAGNOSTICS
    name = "grad_variance"

    def __init__(self, diagnostics: DiagnosticsConfig, vocab_size: int, log=print) -> None:
        self.interval, self.vocab_size, self.log = diagnostics.grad_variance_interval, vocab_size, log
        self.series: list[tuple[int, float, float]] = []  # (step, TEV mean, embedding gradient variance)
        self._micro = torch.zeros(2, dtype=torch.float64)  # sum over micro-batches of ||g_m||^2: all, embedding
        self._values: dict[str, float] = {}
        self._trainer: Any = None

    def _due(self) -> bool:
        t = self._trainer
        return t.model.training and t.step % self.interval == 0

    def on_fit_start(self, trainer: Any) -> None:
        self._trainer = trainer
        tp_rank = trainer.ctx.tp_rank
        scale = float(trainer.engine.gradient_accumulation_steps())  # DeepSpeed divides each loss by it

        def watch(name: str, p: torch.nn.Parameter, grad: torch.Tensor) -> None:
            if (_sharded(p) or tp_rank == 0) and self._due():
                sq = sum_of_squares(grad).cpu() * scale * scale
                self._micro[0] += sq
                if name == "embedding.word_embeddings.weight":
                    self._micro[1] += sq

        trainer.step_object.add_grad_observer(watch)

    def on_before_optimizer_step(self, trainer: Any) -> None:
        if trainer.step % self.interval:
            return
        tp_rank, tp_group = trainer.ctx.tp_rank, trainer.ctx.tp_group
        mean_sq = torch.zeros(4, dtype=torch.float64)  # ||g_bar||^2 all, embedding; numel all, embedding
        for name, p in trainer.model.named_parameters():
            g = _full_grad(p)  # a collective under ZeRO-1: every rank, every parameter
            if _sharded(p) or tp_rank == 0:
                sq, emb = sum_of_squares(g).cpu(), name == "embedding.word_embeddings.weight"
                mean_sq += torch.tensor([sq, sq if emb else 0.0, p.numel(), p.numel() if emb else 0.0],
                                        dtype=torch.float64)
        micro = self._micro.clone()
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(micro)  # every micro-batch of every data-parallel rank
            if tp_group is not None and dist.get_world_size(tp_group) > 1:
                dist.all_reduce(mean_sq, group=tp_group)  # g_bar is the same on every DP rank
        n = trainer.engine.gradient_accumulation_steps() * trainer.ctx.dp_size
        self._values = {"stability/grad_var": grad_variance(float(micro[0]), n, float(mean_sq[0]), int(mean_sq[2])),
                        "stability/grad_var_embedding": grad_variance(float(micro[1]), n, float(mean_sq[1]),
                                                                      int(mean_sq[3]))}
        self._micro.zero_()

    def on_step_end(self, trainer: Any, metrics: Any) -> None:
        if metrics.step % self.interval == 0 and self._values:
            for k, v in self._values.items():
                trainer.record_metric(k, v)
            tev = metrics.tev_mean
            if tev is None:
                tev = embedding_tev(trainer.model, self.vocab_size, trainer.ctx.tp_group).mean
            self.series.append((metrics.step, tev, self._values["stability/grad_var_embedding"]))
            self._values = {}
        if metrics.step == trainer.end_step and len(self.series) >= 3:
            tev = [s[1] for s in self.series]
            var = [s[2] for s in self.series]
            raw = spearman(tev, var)
            diff = spearman([b - a for a, b in zip(tev, tev[1:])], [b - a for a, b in zip(var, var[1:])])
            for key, value in (("tev/gradvar_spearman", raw), ("tev/gradvar_spearman_diff", diff)):
                if value is not None:
                    trainer.record_metric(key, value)
            self.log(f"[stability] Spearman of TEV mean with the embedding gradient variance over "
                     f"{len(self.series)} steps: {raw if raw is None else round(raw, 3)} raw, "
                     f"{diff if diff is None else round(diff, 3)} on first differences")

    def state_dict(self) -> dict[str, Any]:
        return {"series": [list(s) for s in self.series]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.series = [tuple(s) for s in state.get("series", [])]


def stability_callbacks(diagnostics: DiagnosticsConfig, *, sequence_parallel: bool, vocab_size: int,
                        log=print) -> list[Callback]:
    """The stability callbacks the `diagnostics` section turns on (the spike monitor always)."""
    out: list[Callback] = [SpikeMonitor(diagnostics, log)]
    if diagnostics.interval:
        out += [LayerNorms(diagnostics), ResidualProbe(diagnostics, sequence_parallel)]
    if diagnostics.grad_variance_interval:
        out.append(GradVariance(diagnostics, vocab_size, log))
    return out
