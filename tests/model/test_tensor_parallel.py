"""TP = 2 and 4 compute the TP = 1 function: logits and every gathered gradient, every variant,
in gpt2 blocks and in llama blocks (grouped-query attention at every key/value-head count the TP
size allows, MHA and MLRA).

Each case builds the TP = 1 model and the TP = W model on every rank of a W-process launch,
loads the same full weights (drawn at std 0.3) into both, the TP = W one through the converter,
and compares logits (gathered over the vocabulary shards) and the gradients of every
parameter (gathered along their partition dims) after one backward pass. A converter that gets
the per-head QKV interleave wrong is shown to fail the same comparison.
"""

from __future__ import annotations

import pytest

from tests.dist import dist_case, dist_result
from tests.model.helpers import LLAMA_VARIANTS, VARIANTS, llama_cfg, llama_id, tiny_cfg, variant_id

pytestmark = pytest.mark.slow  # every test here launches processes

TOL = 1e-5


def _run(cfg, tp: int, full: dict | None, permute_qkv: bool = False):
    """(full logits, full grads, full weights used) of one forward/backward at TP = tp."""
    return _run_many([cfg], tp, [full], permute_qkv)[0]


def _run_many(cfgs: list, tp: int, fulls: list, permute_qkv: bool = False) -> list:
    """`_run` for several configs under one parallel set-up (its process groups are made once)."""
    from mlra_mega import distributed
    from mlra_mega.config import ParallelConfig

    ctx = distributed.setup(ParallelConfig(tensor=tp), seed=1)
    try:
        return [_forward_backward(cfg, tp, full, permute_qkv, ctx) for cfg, full in zip(cfgs, fulls)]
    finally:
        distributed.teardown(keep_process_group=True)


def _forward_backward(cfg, tp: int, full: dict | None, permute_qkv: bool, ctx):
    """One forward/backward of `cfg` at TP = tp in the current parallel state."""
    import torch
    from megatron.core import parallel_state

    from mlra_mega.model.build import build_model
    from mlra_mega.model.convert import gather_full, load_shard, partition_dims, shard_state_dict
    from tests.model.helpers import large_weights, tokens

    model = build_model(cfg)
    dims = partition_dims(model)
    if full is None:
        full = large_weights(model)
    weights = dict(full)
    if permute_qkv:
        weights = {k: (_blocked_qkv(v, cfg) if k.endswith("linear_qkv.weight") else v) for k, v in full.items()}
    group = parallel_state.get_tensor_model_parallel_group()
    load_shard(model, shard_state_dict(weights, dims, tp, parallel_state.get_tensor_model_parallel_rank()))
    model.to(ctx.device)  # a GPU where there is one (bench/gpu.py runs this there)
    ids, positions, labels = (t.to(ctx.device) for t in tokens())
    logits = model(ids, positions, None)
    loss = model(ids, positions, None, labels=labels).mean()
    loss.backward()
    parts = [torch.empty_like(logits) for _ in range(tp)]
    torch.distributed.all_gather(parts, logits.detach().contiguous(), group=group)
    grads = gather_full({n: p.grad for n, p in model.named_parameters()}, dims, group)
    return torch.cat(parts, dim=-1).cpu(), {n: g.cpu() for n, g in grads.items()}, full


def _blocked_qkv(w, cfg):
    """The classic bug: reading megatron's per-head [q_h, k_h, v_h] rows as [all q; all k; all v]."""
    h, dh, d = cfg.num_heads, cfg.head_dim, cfg.hidden_size
    return w.view(3, h, dh, d).transpose(0, 1).reshape(3 * d, d)


def equivalence() -> dict[str, tuple[float, float, int]]:
    import torch.distributed as dist

    world = dist.get_world_size()
    out = {}
    llama = [v for v in LLAMA_VARIANTS if v[1] % world == 0]
    cfgs = [tiny_cfg(*v) for v in VARIANTS] + [llama_cfg(v) for v in llama]
    ids = [variant_id(v) for v in VARIANTS] + [llama_id(v) for v in llama]
    refs = _run_many(cfgs, 1, [None] * len(cfgs))
    runs = _run_many(cfgs, world, [full for _, _, full in refs])
    for name, (ref_logits, ref_grads, _), (logits, grads, _) in zip(ids, refs, runs):
        assert set(grads) == set(ref_grads)
        grad_err = max((grads[n] - ref_grads[n]).abs().max().item() for n in ref_grads)
        out[name] = ((logits - ref_logits).abs().max().item(), grad_err, len(grads))
    return out


@dist_case(2, 4)
def tp_equivalence() -> dict:
    return equivalence()


@dist_case(2)
def permuted_heads() -> tuple[float, float]:
    cfg = tiny_cfg("mha")
    ref_logits, _, full = _run(cfg, 1, None)
    # Same permutation at TP = 1 and TP = 2 is harmless; applied only where we shard, it is not.
    right, _, _ = _run(cfg, 2, full)
    wrong, _, _ = _run(cfg, 2, full, permute_qkv=True)
    return (right - ref_logits).abs().max().item(), (wrong - ref_logits).abs().max().item()


@pytest.mark.parametrize("tp", [2, 4])
@pytest.mark.parametrize("variant", [variant_id(v) for v in VARIANTS])
def test_tp_matches_tp1(tp: int, variant: str) -> None:
    per_rank = dist_result(__name__, tp, "tp_equivalence")
    for rank_result in per_rank:
        logit_err, grad_err, n_params = rank_result[variant]
        assert n_params > 10
        assert logit_err <= TOL, f"logits differ by {logit_err:.2e} at TP={tp}"
        assert grad_err <= TOL, f"a gradient differs by {grad_err:.2e} at TP={tp}"


@pytest.mark.parametrize("tp,variant", [(tp, llama_id(v)) for tp in (2, 4) for v in LLAMA_VARIANTS
                                        if v[1] % tp == 0])  # the rest is refused (test_config)
def test_llama_tp_matches_tp1(tp: int, variant: str) -> None:
    test_tp_matches_tp1(tp, variant)


def test_permuted_head_layout_is_caught() -> None:
    (right, wrong), _ = dist_result(__name__, 2, "permuted_heads")
    assert right <= TOL
    assert wrong > 1e-2, f"a wrong QKV layout changed logits by only {wrong:.2e}: the test could not see it"
