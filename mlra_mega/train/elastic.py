"""Checkpoints across layouts: any checkpoint read as layout-free training state, that state
loaded into an engine of another layout, and written as per-rank files for a given TP x PP
(`train/reshard.py` writes whole resharded checkpoints).

The state of a run that does not depend on its layout is, per parameter under its PP=1 name, the
whole fp32 tensor and its two AdamW moments, plus AdamW's step count. `read_state` gets it from:

- DeepSpeed's own files at any ZeRO stage (read with `safe_load`): stage 0 keeps the module and
  torch's optimizer state per parameter; stages 1-2 keep each data-parallel rank's slice of the
  flat fp32 groups with DeepSpeed's `param_slice_mappings` (each parameter's fragment in the
  rank's slice; the fragments of one parameter, in rank order, are its flattened values); stage 3
  keeps each parameter cut into equal, zero-padded pieces, one per rank, in `param_shapes` order.
  What DeepSpeed does not record (which TP rank and stage a file is, how each parameter splits
  over TP, the local names of the optimizer's groups) our checkpointer adds to every model-states
  file as `client_state["mlra"]` (`stage_meta`).
- the `elastic/` files of `mlra-mega reshard`: per TP rank and stage, that rank's slices.

Tensor-parallel slices are joined along their `partition_dim` and cut again for the reader's TP
rank. `load_state` puts a rank's slice into any engine: module weights, DeepSpeed's fp32 master
and optimizer fragments through its public `safe_set_full_*` functions (ZeRO 1-3), torch's
optimizer state directly at ZeRO-0.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mlra_mega.config import ConfigError
from mlra_mega.model.convert import partition_dims
from mlra_mega.model.pipeline import global_name, is_tied_copy, layer_offset
from mlra_mega.train.safe_load import safe_load

__all__ = ["KEYS", "META", "ELASTIC_DIR", "State", "stage_meta", "read_state", "load_state", "describe_layout",
           "stage_names", "write_elastic", "elastic_file", "slice_state"]

KEYS = ("fp32", "exp_avg", "exp_avg_sq")
META = "mlra"  # our key in DeepSpeed's client_state
ELASTIC_DIR = "elastic"
_LAYER = re.compile(r"decoder\.layers\.(\d+)\.")


@dataclass
class State:
    """Training state of some parameters, each `{KEYS: tensor}` sliced for one TP rank."""

    params: dict[str, dict[str, Tensor]]
    optimizer_step: float
    counters: dict[str, int] = field(default_factory=dict)  # DeepSpeed's global_steps, global_samples, ...
    dims: dict[str, int | None] = field(default_factory=dict)  # TP partition dim per name


def describe_layout(layout: dict[str, Any]) -> str:
    """`TP2 x PP2 x DP2 ZeRO-1`, the way the resharding line names a layout."""
    parts = [f"TP{layout.get('tensor', 1)}"]
    if layout.get("pipeline", 1) > 1:
        parts.append(f"PP{layout['pipeline']}")
    if layout.get("format") == "elastic":
        return " x ".join(parts) + " (resharded)"
    parts.append(f"DP{layout.get('data', 1)}")
    return " x ".join(parts) + f" ZeRO-{layout.get('zero_stage', 0)}"


def stage_meta(engine: Any, tp_rank: int, tp_size: int, pp_rank: int) -> dict[str, Any]:
    """What a model-states file needs beyond DeepSpeed's own record to be read at another layout."""

    model = engine.module
    names = {p: n for n, p in model.named_parameters()}
    groups = [[names[p] for p in g["params"]] for g in _client_param_groups(engine)]
    return {"tp_rank": tp_rank, "tp_size": tp_size, "pp_rank": pp_rank, "layer_offset": layer_offset(model),
            "partition_dims": partition_dims(model),
            "tied_copy": [n for n in names.values() if is_tied_copy(model, n)], "param_groups": groups}


def _client_param_groups(engine: Any) -> list[dict[str, Any]]:
    opt = engine.optimizer
    if isinstance(opt, torch.optim.Optimizer):
        return opt.param_groups
    groups = getattr(opt, "bit16_groups", None) or getattr(opt, "fp16_groups", None) or []
    return [{"params": g} for g in groups]


# -- reading ------------------------------------------------------------------------------------


def _refuse(path: Path, problem: str) -> ConfigError:
    return ConfigError("checkpoint", f"{path} cannot be resharded: {problem}",
                       "resume it on the layout it was written at (same parallel.tensor, parallel.pipeline, "
                       "world size and zero.stage)")


def _model_states(path: Path, mp: int, stage: int) -> Path:
    return path / (f"zero_pp_rank_0_mp_rank_{mp:02d}_model_states.pt" if stage == 3
                   else f"mp_rank_{mp:02d}_model_states.pt")


def _optim_file(path: Path, mp: int, dp: int) -> Path:
    for prefix in ("", "bf16_"):
        f = path / f"{prefix}zero_pp_rank_{dp}_mp_rank_{mp:02d}_optim_states.pt"
        if f.is_file():
            return f
    raise _refuse(path, f"zero_pp_rank_{dp}_mp_rank_{mp:02d}_optim_states.pt is missing")


def _stage0(states: dict[str, Any], meta: dict[str, Any]) -> tuple[dict[str, dict[str, Tensor]], float]:
    """Module weights and torch's AdamW state (indexed in the optimizer's group order)."""
    names = [n for g in meta["param_groups"] for n in g]
    opt = states["optimizer"]
    out, step = {}, 0.0
    for i, name in enumerate(names):
        value = states["module"][name].float()
        s = opt["state"].get(i, {})
        step = float(s.get("step", step))
        out[name] = {"fp32": value, "exp_avg": s.get("exp_avg", torch.zeros_like(value)).float(),
                     "exp_avg_sq": s.get("exp_avg_sq", torch.zeros_like(value)).float()}
    return out, step


def _zero12(path: Path, mp: int, dp_size: int, shapes: dict[str, torch.Size]
            ) -> tuple[dict[str, dict[str, Tensor]], float]:
    """Each parameter's fragments, rank by rank, out of the flat fp32 partitions and moments."""
    fragments: dict[str, dict[str, list[Tensor]]] = {}
    step = 0.0
    for d in range(dp_size):
        f = _optim_file(path, mp, d)
        osd = safe_load(f, map_location="cpu")["optimizer_state_dict"]
        base = osd.get("base_optimizer_state")
        if not isinstance(base, dict) or "state" not in base or "param_slice_mappings" not in osd:
            raise _refuse(path, f"{f.name} is not a ZeRO-1/2 optimizer state this version reads "
                          "(zero_optimization.elastic_checkpoint or an older DeepSpeed)")
        for i, mapping in enumerate(osd["param_slice_mappings"]):
            flat = {"fp32": osd["single_partition_of_fp32_groups"][i].float()}
            gstate = base["state"].get(i, {})
            step = float(gstate.get("step", step))
            for key in KEYS[1:]:
                flat[key] = gstate[key].float() if key in gstate else torch.zeros_like(flat["fp32"])
            for name, addr in mapping.items():
                per = fragments.setdefault(name, {k: [] for k in KEYS})
                for key in KEYS:
                    per[key].append(flat[key].narrow(0, addr.start, addr.numel))
    return {name: {k: torch.cat(v).view(shapes[name]) for k, v in per.items()} for name, per in fragments.items()}, step


def _zero3(path: Path, mp: int, dp_size: int, shapes: dict[str, torch.Size]
           ) -> tuple[dict[str, dict[str, Tensor]], float]:
    """Each parameter's equal pieces, one per rank, in `param_shapes` order over the flat groups."""
    flats: list[dict[str, Tensor]] = []
    step = 0.0
    for d in range(dp_size):
        osd = safe_load(_optim_file(path, mp, d), map_location="cpu")["optimizer_state_dict"]
        groups, base = osd["fp32_flat_groups"], osd["optimizer_state_dict"]["state"]
        rank = {"fp32": torch.cat([g.float() for g in groups])}
        for key in KEYS[1:]:
            rank[key] = torch.cat([base[i][key].float() if key in base.get(i, {}) else torch.zeros_like(g)
                                   for i, g in enumerate(groups)])
        step = float(base.get(0, {}).get("step", step))
        flats.append(rank)
    out, offset = {}, 0
    for name, shape in shapes.items():
        numel = math.prod(shape)
        piece = math.ceil(numel / dp_size)
        out[name] = {k: torch.cat([r[k].narrow(0, offset, piece) for r in flats])[:numel].view(shape) for k in KEYS}
        offset += piece
    return out, step


def _read_native(path: Path, layout: dict[str, Any], wanted: Callable[[str], bool]
                 ) -> tuple[dict[str, list[dict[str, Tensor] | None]], dict[str, int | None], float, dict[str, int]]:
    """{global name: [per-TP-rank tensors]}, dims, AdamW step, DeepSpeed counters."""
    tp, pp, dp, stage = layout["tensor"], layout.get("pipeline", 1), layout["data"], layout["zero_stage"]
    shards: dict[str, list[Any]] = {}
    dims: dict[str, int | None] = {}
    step, counters = 0.0, {}
    for mp in range(tp * pp):
        f = _model_states(path, mp, stage)
        if not f.is_file():
            raise _refuse(path, f"{f.name} is missing")
        states = safe_load(f, map_location="cpu")
        meta = states.get(META)
        if meta is None:
            raise _refuse(path, "it was written before elastic checkpoints (no layout record in its model states)")
        counters = {k: int(states[k]) for k in ("global_steps", "global_samples", "skipped_steps") if k in states}
        shapes = {n: torch.Size(s) for g in states.get("param_shapes") or [] for n, s in g.items()}
        if states.get("optimizer") is not None:
            local, step = _stage0(states, meta)
        elif stage == 3:
            local, step = _zero3(path, mp, dp, shapes)
        else:
            local, step = _zero12(path, mp, dp, shapes)
        offset, tied = meta["layer_offset"], set(meta["tied_copy"])
        for name, tensors in local.items():
            g = global_name(name, offset)
            if name in tied or not wanted(g):
                continue  # the last stage's copy of the tied matrix: the first stage's is the same
            shards.setdefault(g, [None] * tp)[meta["tp_rank"]] = tensors
            dims[g] = meta["partition_dims"][name]
    return shards, dims, step, counters


def elastic_file(tp_rank: int, pp_rank: int) -> str:
    return f"tp{tp_rank:02d}-pp{pp_rank:02d}.pt"


def _read_elastic(path: Path, layout: dict[str, Any], wanted: Callable[[str], bool], ranks: Iterable[int]
                  ) -> tuple[dict[str, list[Any]], dict[str, int | None], float, dict[str, int]]:
    tp, pp = layout["tensor"], layout.get("pipeline", 1)
    shards: dict[str, list[Any]] = {}
    dims: dict[str, int | None] = {}
    step, counters = 0.0, {}
    for t in ranks:
        for s in range(pp):
            data = safe_load(path / ELASTIC_DIR / elastic_file(t, s), map_location="cpu")
            step, counters = float(data["optimizer_step"]), data["counters"]
            for g, tensors in data["params"].items():
                if wanted(g):
                    shards.setdefault(g, [None] * tp)[t] = tensors
                    dims[g] = data["dims"][g]
    return shards, dims, step, counters


def read_state(path: Path, layout: dict[str, Any], *, tp_size: int = 1, tp_rank: int = 0,
               wanted: Callable[[str], bool] = lambda name: True) -> State:
    """The `wanted` parameters of the checkpoint at `path` (its sidecar's `layout`), sliced for
    TP rank `tp_rank` of `tp_size`."""
    old_tp = layout["tensor"]
    if layout.get("format") == "elastic":
        same = old_tp == tp_size  # then only this rank's files are read
        shards, dims, step, counters = _read_elastic(path, layout, wanted, [tp_rank] if same else range(old_tp))
    else:
        shards, dims, step, counters = _read_native(path, layout, wanted)
    return State(params=_sliced(path, shards, dims, tp_size, tp_rank), optimizer_step=step, counters=counters,
                 dims=dims)


def _sliced(path: Path, shards: dict[str, list[Any]], dims: dict[str, int | None], tp_size: int, tp_rank: int
            ) -> dict[str, dict[str, Tensor]]:
    """Per-old-TP-rank tensors joined along their partition dim and cut for `tp_rank` of `tp_size`."""
    params = {}
    for g, per_rank in shards.items():
        dim = dims[g]
        if dim is None:
            params[g] = next(t for t in per_rank if t is not None)
            continue
        if len(per_rank) == tp_size:
            params[g] = per_rank[tp_rank]
            continue
        if any(t is None for t in per_rank):
            raise _refuse(path, f"the tensor-parallel slices of {g} are incomplete")
        params[g] = {}
        for key in KEYS:
            full = torch.cat([t[key] for t in per_rank], dim=dim) if len(per_rank) > 1 else per_rank[0][key]
            if full.shape[dim] % tp_size:
                raise ConfigError("parallel.tensor", f"{tp_size} does not divide {g}'s {full.shape[dim]} rows "
                                  f"along dim {dim}", "choose a tensor-parallel size that divides the model's widths")
            params[g][key] = full.chunk(tp_size, dim=dim)[tp_rank].clone()
    return params


def slice_state(state: State, tp_size: int, tp_rank: int, path: Path = Path(".")) -> State:
    """A TP=1 state cut for `tp_rank` of `tp_size`."""
    shards = {g: [t] for g, t in state.params.items()}
    return State(params=_sliced(path, shards, state.dims, tp_size, tp_rank), optimizer_step=state.optimizer_step,
                 counters=state.counters, dims=state.dims)


# -- loading into an engine ----------------------------------------------------------------------


def _prepare_optimizer_state(engine: Any, step: float) -> None:
    """Moment tensors for DeepSpeed's flat fp32 partitions (AdamW creates them only at its first
    step), linked to the parameters' fragments so `safe_set_full_optimizer_state` can fill them."""
    opt = engine.optimizer
    inner = opt.optimizer
    # ZeRO-3 hands its optimizer one sub-group's partition at a time (the groups are empty between
    # steps), the others keep theirs in the groups.
    flats = getattr(opt, "fp32_partitioned_groups_flat", None) or [p for g in inner.param_groups for p in g["params"]]
    for flat in flats:
        inner.state[flat] = {"step": torch.tensor(step, dtype=torch.float32),
                             "exp_avg": torch.zeros_like(flat), "exp_avg_sq": torch.zeros_like(flat)}
    if hasattr(opt, "_lazy_init_hp_params_optimizer_state"):  # ZeRO-1/2, bf16: link the fragments now
        opt._hp_optimizer_states_linked = False
        opt._lazy_init_hp_params_optimizer_state()


def load_state(engine: Any, state: State, path: Path) -> None:
    """This rank's slice of `state` into `engine`: weights, fp32 master, AdamW moments and steps."""
    import torch.distributed as dist
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    model = engine.module
    offset = layer_offset(model)
    plain = isinstance(engine.optimizer, torch.optim.Optimizer)  # ZeRO-0 in fp32: torch's AdamW itself
    if not plain:
        _prepare_optimizer_state(engine, state.optimizer_step)
    for name, p in model.named_parameters():
        g = global_name(name, offset, tied_copy=is_tied_copy(model, name))
        if g not in state.params:
            raise _refuse(path, f"it has no {g} (a different model, or a stage missing)")
        t = state.params[g]
        shape = tuple(p.ds_shape) if hasattr(p, "ds_id") else tuple(p.shape)
        if tuple(t["fp32"].shape) != shape:
            raise _refuse(path, f"{g} has shape {tuple(t['fp32'].shape)}, this layout's model {shape}")
        value = t["fp32"].to(p.device)
        with torch.no_grad():
            if plain:
                p.copy_(value)
                engine.optimizer.state[p] = {"step": torch.tensor(state.optimizer_step, dtype=torch.float32),
                                             **{k: t[k].to(p.device).clone() for k in KEYS[1:]}}
                continue
            if hasattr(p, "ds_id"):  # ZeRO-3: this rank's piece of the working copy
                piece = p.ds_tensor.numel()
                flat = torch.zeros(piece * dist.get_world_size(p.ds_process_group), dtype=value.dtype,
                                   device=value.device)
                flat[:value.numel()] = value.flatten()
                r = dist.get_rank(p.ds_process_group)
                p.ds_tensor.data.copy_(flat[r * piece:(r + 1) * piece].to(p.ds_tensor.dtype))
            else:
                p.copy_(value.to(p.dtype))
            safe_set_full_fp32_param(p, value)
            for key in KEYS[1:]:
                safe_set_full_optimizer_state(p, t[key].to(p.device), key)
    for key, value in state.counters.items():
        setattr(engine, key, value)


# -- writing resharded ---------------------------------------------------------------------------


def stage_names(names: Iterable[str], num_layers_per_stage: list[int], stage: int, tied: bool) -> list[str]:
    """The global names a pipeline stage holds (the word embeddings on the last stage too when tied:
    its output layer's copy)."""
    last = len(num_layers_per_stage) - 1
    first_layer = sum(num_layers_per_stage[:stage])
    layers = range(first_layer, first_layer + num_layers_per_stage[stage])
    out = []
    for name in names:
        m = _LAYER.search(name)
        if m is not None:
            keep = int(m.group(1)) in layers
        elif name.startswith("embedding."):
            keep = stage == 0 or (tied and stage == last and name == "embedding.word_embeddings.weight")
        else:  # final norm, output layer
            keep = stage == last
        if keep:
            out.append(name)
    return out


def write_elastic(out: Path, state: State, tp_size: int, tp_rank: int, stage: int, names: list[str]) -> Path:
    """One TP rank's and stage's slices as `elastic/tpNN-ppMM.pt`."""
    (out / ELASTIC_DIR).mkdir(parents=True, exist_ok=True)
    f = out / ELASTIC_DIR / elastic_file(tp_rank, stage)
    torch.save({"params": {g: state.params[g] for g in names}, "dims": {g: state.dims[g] for g in names},
                "optimizer_step": state.optimizer_step, "counters": state.counters, "tensor": tp_size}, f)
    return f
