"""Full state dict <-> tensor-parallel shards, and MLRA -> MHA by composing the factors.

Which tensors are split, and along which dimension, is read off the model itself: megatron
marks every tensor-parallel parameter with `tensor_model_parallel` and `partition_dim` (and our
MLRA factors are marked the same way). The marks do not depend on the TP size, so the layout
of a TP=1 model describes every TP size. Every split is an even contiguous chunk: column-parallel
weights are ordered query group by query group (megatron's QKV interleave, our A factors; one
group per head without grouped-query attention) or by vocabulary row, and SwiGLU's [gate; up]
is one [2, f, d] tensor split along f.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from mlra_mega.config import ModelConfig

__all__ = ["partition_dims", "shard_state_dict", "merge_shards", "load_shard", "gather_full",
           "full_state_dict", "group_split", "group_join", "mha_to_mlra", "mlra_to_mha"]


def partition_dims(model: torch.nn.Module) -> dict[str, int | None]:
    """{parameter name: the dimension TP splits, or None where every rank holds it whole}."""
    return {name: (int(p.partition_dim) if getattr(p, "tensor_model_parallel", False) else None)
            for name, p in model.named_parameters()}


def shard_state_dict(full: dict[str, Tensor], dims: dict[str, int | None], tp_size: int,
                     tp_rank: int) -> dict[str, Tensor]:
    """The tensors TP rank `tp_rank` of `tp_size` holds."""
    missing = sorted(set(dims) - set(full))
    if missing:
        raise KeyError(f"full state dict lacks {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    out = {}
    for name, dim in dims.items():
        t = full[name]
        if dim is None:
            out[name] = t.clone()
        else:
            if t.shape[dim] % tp_size:
                raise ValueError(f"{name}: size {t.shape[dim]} along dim {dim} does not split over TP={tp_size}")
            out[name] = t.chunk(tp_size, dim=dim)[tp_rank].clone()
    return out


def merge_shards(shards: list[dict[str, Tensor]], dims: dict[str, int | None]) -> dict[str, Tensor]:
    """The full state dict from every TP rank's shard, in rank order."""
    return {name: (shards[0][name].clone() if dim is None else torch.cat([s[name] for s in shards], dim=dim))
            for name, dim in dims.items()}


def load_shard(model: torch.nn.Module, shard: dict[str, Tensor]) -> None:
    """Copies a shard into the model's parameters; the names must match exactly."""
    params = dict(model.named_parameters())
    missing, unexpected = sorted(set(params) - set(shard)), sorted(set(shard) - set(params))
    if missing or unexpected:
        raise KeyError(f"shard does not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    with torch.no_grad():
        for name, p in params.items():
            if p.shape != shard[name].shape:
                raise ValueError(f"{name}: shard shape {tuple(shard[name].shape)} != model {tuple(p.shape)}")
            p.copy_(shard[name])


def gather_full(local: dict[str, Tensor], dims: dict[str, int | None],
                group: dist.ProcessGroup | None = None) -> dict[str, Tensor]:
    """All-gathers per-rank tensors (parameters or gradients) of one TP group into full ones."""
    size = dist.get_world_size(group) if group is not None else 1
    out = {}
    for name, dim in dims.items():
        t = local[name].detach().contiguous()
        if dim is None or size == 1:
            out[name] = t.clone()
            continue
        parts = [torch.empty_like(t) for _ in range(size)]
        dist.all_gather(parts, t, group=group)
        out[name] = torch.cat(parts, dim=dim)
    return out


def full_state_dict(model: torch.nn.Module, group: dist.ProcessGroup | None = None) -> dict[str, Tensor]:
    """The whole model's parameters, gathered over its TP group (every rank gets them)."""
    if group is None:
        from megatron.core import parallel_state

        if parallel_state.model_parallel_is_initialized():
            group = parallel_state.get_tensor_model_parallel_group()
    return gather_full(dict(model.named_parameters()), partition_dims(model), group)


def _group_heads(cfg: ModelConfig) -> dict[str, int]:
    """Heads of q, k and v in one query group (per group: its q heads, one k head, one v head)."""
    return {"q": cfg.num_heads // cfg.kv_heads, "k": 1, "v": 1}


def group_split(t: Tensor, names: list[str] | str, cfg: ModelConfig, size: int) -> dict[str, Tensor]:
    """Rows laid out group by group ([q heads, k, v] of each query group, restricted to `names`,
    `size` rows a head: megatron's QKV order, our MLRA A factors) -> {name: [its heads, size, ...]}."""
    per = _group_heads(cfg)
    rest = t.shape[1:]
    grouped = t.reshape(cfg.kv_heads, sum(per[p] for p in names) * size, *rest)
    parts = torch.split(grouped, [per[p] * size for p in names], dim=1)
    return {p: x.reshape(cfg.kv_heads * per[p], size, *rest) for p, x in zip(names, parts)}


def group_join(parts: dict[str, Tensor], names: list[str] | str, cfg: ModelConfig) -> Tensor:
    """The inverse of `group_split`: {name: [its heads, size, ...]} -> rows group by group."""
    per = _group_heads(cfg)
    grouped = [parts[p].reshape(cfg.kv_heads, per[p] * parts[p].shape[1], *parts[p].shape[2:]) for p in names]
    joined = torch.cat(grouped, dim=1)
    return joined.reshape(-1, *joined.shape[2:])


def _attention_prefixes(full: dict[str, Tensor]) -> list[str]:
    return sorted({k.rsplit("self_attention.", 1)[0] + "self_attention." for k in full if "self_attention." in k},
                  key=lambda p: int(p.split("layers.")[1].split(".")[0]) if "layers." in p else -1)


def mlra_to_mha(full: dict[str, Tensor], cfg: ModelConfig) -> dict[str, Tensor]:
    """The state dict of the MHA model computing the same function: W_h = A_h B_h per head.

    Input: a full MLRA state dict (`cfg.attention == "mlra"`); output: the full state dict of
    the same config with `attention = "mha"`, megatron's QKV layout (group by group: the group's
    q heads, its k, its v; with one group per head, head by head). Biases only where the block
    type has them (gpt2).
    """
    h, dh, d, r = cfg.num_heads, cfg.head_dim, cfg.hidden_size, cfg.mlra_rank
    factorized = [p for p in ("q", "k", "v") if p in cfg.mlra.factorize]
    full_proj = [p for p in ("q", "k", "v") if p not in cfg.mlra.factorize]
    bias = cfg.arch == "gpt2"
    out = {k: v for k, v in full.items() if "self_attention." not in k}
    for pre in _attention_prefixes(full):
        weights, biases = {}, {}
        if factorized:
            a = group_split(full[pre + "linear_a.weight"], factorized, cfg, r)   # p: [heads, r, d], A^T per head
            for p in factorized:
                b = full[pre + f"linear_b_{p}.weight"]                           # [heads, r, dh]
                weights[p] = torch.einsum("hro,hri->hoi", b, a[p])               # [heads, dh, d] = (A B)^T
                if bias:
                    biases[p] = full[pre + f"linear_b_{p}.bias"][:, :, None]     # [heads, dh, 1]
        if full_proj:
            weights.update(group_split(full[pre + "linear_qkv.weight"], full_proj, cfg, dh))
            if bias:
                biases.update(group_split(full[pre + "linear_qkv.bias"][:, None], full_proj, cfg, dh))
        out[pre + "linear_qkv.weight"] = group_join(weights, "qkv", cfg)
        if bias:
            out[pre + "linear_qkv.bias"] = group_join(biases, "qkv", cfg)[:, 0]
        if "o" in cfg.mlra.factorize:
            a_o = full[pre + "linear_proj.linear_a.weight"]                      # [h, dh, r]
            b_o = full[pre + "linear_proj.linear_b.weight"].view(d, h, r)        # [d, h, r]
            out[pre + "linear_proj.weight"] = torch.einsum("dhr,hir->dhi", b_o, a_o).reshape(d, h * dh)
            if bias:
                out[pre + "linear_proj.bias"] = full[pre + "linear_proj.linear_b.bias"]
        else:
            out[pre + "linear_proj.weight"] = full[pre + "linear_proj.weight"]
            if bias:
                out[pre + "linear_proj.bias"] = full[pre + "linear_proj.bias"]
    return out


def _low_rank(w: Tensor, r: int) -> tuple[Tensor, Tensor, float]:
    """(L [m, r], R [r, n], discarded squared singular values) with L R the best rank-r w [m, n]."""
    u, s, vh = torch.linalg.svd(w.double(), full_matrices=False)
    k = min(r, s.numel())
    root = s[:k].sqrt()
    left = torch.zeros(w.shape[0], r, dtype=torch.float64)
    right = torch.zeros(r, w.shape[1], dtype=torch.float64)
    left[:, :k], right[:k] = u[:, :k] * root, root[:, None] * vh[:k]
    return left.float(), right.float(), float((s[k:] ** 2).sum())


def mha_to_mlra(full: dict[str, Tensor], cfg: ModelConfig) -> tuple[dict[str, Tensor], list[float]]:
    """The MLRA state dict closest to an MHA one: each head's factorized projection W_h replaced by
    its truncated SVD at rank r (exact at r >= its rank, e.g. r = d_head), and the relative
    reconstruction error ||W - A B|| / ||W|| of each layer's factorized projections together.
    With grouped-query attention, k and v are factored per key/value head.

    Input: a full MHA state dict (megatron's QKV layout); output: the state dict of `cfg`
    (`attention = "mlra"`), the inverse of `mlra_to_mha` where that is exact.
    """
    h, dh, d, r = cfg.num_heads, cfg.head_dim, cfg.hidden_size, cfg.mlra_rank
    factorized = [p for p in ("q", "k", "v") if p in cfg.mlra.factorize]
    full_proj = [p for p in ("q", "k", "v") if p not in cfg.mlra.factorize]
    bias = cfg.arch == "gpt2"
    out = {k: v for k, v in full.items() if "self_attention." not in k}
    errors = []
    for pre in _attention_prefixes(full):
        w = group_split(full[pre + "linear_qkv.weight"], "qkv", cfg, dh)                # p: [heads, dh, d]
        b = group_split(full[pre + "linear_qkv.bias"][:, None], "qkv", cfg, dh) if bias else {}
        lost, total = 0.0, 0.0
        if factorized:
            a = {}
            for p in factorized:
                heads = w[p].shape[0]
                a[p], b_p = torch.zeros(heads, r, d), torch.zeros(heads, r, dh)
                for head in range(heads):
                    left, right, gone = _low_rank(w[p][head], r)        # W_h [dh, d] = left [dh, r] right [r, d]
                    b_p[head], a[p][head] = left.t(), right
                    lost, total = lost + gone, total + float(w[p][head].double().pow(2).sum())
                out[pre + f"linear_b_{p}.weight"] = b_p
                if bias:
                    out[pre + f"linear_b_{p}.bias"] = b[p][:, :, 0].clone()
            out[pre + "linear_a.weight"] = group_join(a, factorized, cfg)
        if full_proj:
            out[pre + "linear_qkv.weight"] = group_join(w, full_proj, cfg).clone()
            if bias:
                out[pre + "linear_qkv.bias"] = group_join(b, full_proj, cfg)[:, 0].clone()
        w_o = full[pre + "linear_proj.weight"]
        if "o" in cfg.mlra.factorize:
            per_head = w_o.view(d, h, dh)
            a_o, b_o = torch.zeros(h, dh, r), torch.zeros(d, h, r)
            for head in range(h):
                left, right, gone = _low_rank(per_head[:, head], r)     # W_o^h [d, dh] = left [d, r] right [r, dh]
                b_o[:, head], a_o[head] = left, right.t()
                lost, total = lost + gone, total + float(per_head[:, head].double().pow(2).sum())
            out[pre + "linear_proj.linear_a.weight"] = a_o
            out[pre + "linear_proj.linear_b.weight"] = b_o.reshape(d, h * r)
            if bias:
                out[pre + "linear_proj.linear_b.bias"] = full[pre + "linear_proj.bias"].clone()
        else:
            out[pre + "linear_proj.weight"] = w_o.clone()
            if bias:
                out[pre + "linear_proj.bias"] = full[pre + "linear_proj.bias"].clone()
        errors.append((lost / total) ** 0.5 if total else 0.0)
    return out, errors
