"""Canaries for each CPU shim: megatron-core's own call still fails without CUDA, ours works.

When a canary's first half stops failing, megatron-core no longer needs that shim: remove it.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from mlra_mega import cpu

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the shims are for machines without CUDA")

CUDA_MISSING = (AssertionError, RuntimeError)


@pytest.fixture
def unpatched() -> Iterator[None]:
    was = cpu.applied()
    cpu.remove()
    yield
    cpu.remove()
    if was:
        cpu.apply()


def seed_tracker() -> None:
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    model_parallel_cuda_manual_seed(123, tp_rank=1, ep_rank=0, etp_rank=0)


def test_rng_tracker(unpatched: None) -> None:
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    with pytest.raises(CUDA_MISSING, match="CUDA"):
        seed_tracker()

    cpu.apply(only=("rng_tracker",))
    torch.manual_seed(5)
    seed_tracker()
    before = torch.rand(2)
    with get_cuda_rng_tracker().fork():
        inside = torch.rand(3)
    after = torch.rand(2)
    # The forked stream is the tensor-parallel seed's (123 + 2718 + tp_rank) ...
    expected_inside = torch.rand(3, generator=torch.Generator().manual_seed(123 + 2718 + 1))
    assert torch.equal(inside, expected_inside)
    # ... and the default stream goes on as if the fork never happened.
    torch.manual_seed(5)
    assert torch.equal(torch.cat([before, after]), torch.rand(4))
    # A second fork continues the tracked stream rather than restarting it.
    with get_cuda_rng_tracker().fork():
        again = torch.rand(3)
    g = torch.Generator().manual_seed(123 + 2718 + 1)
    torch.rand(3, generator=g)
    assert torch.equal(again, torch.rand(3, generator=g))


def test_rng_tracker_serves_activation_checkpointing(unpatched: None) -> None:
    from megatron.core.tensor_parallel.random import _get_all_rng_states, _set_all_rng_states

    seed = 11
    cpu.apply(only=("rng_tracker",))
    torch.manual_seed(seed)
    seed_tracker()
    states = _get_all_rng_states()
    first = torch.rand(4)
    _set_all_rng_states(*states)
    assert torch.equal(torch.rand(4), first)  # recompute sees the same dropout masks


def test_current_device(unpatched: None) -> None:
    from megatron.core.utils import GlobalMemoryBuffer

    with pytest.raises(CUDA_MISSING, match="CUDA"):
        GlobalMemoryBuffer().get_tensor((2, 3), torch.float32, "mpu")

    cpu.apply(only=("current_device",))
    buf = GlobalMemoryBuffer()
    t = buf.get_tensor((2, 3), torch.float32, "mpu")
    assert t.device.type == "cpu" and t.shape == (2, 3)
    small = buf.get_tensor((4,), torch.float32, "mpu")
    assert small.data_ptr() == t.data_ptr()  # reused, as on GPU


def test_deepspeed_shm_op_would_be_jit_built(unpatched: None) -> None:
    """Unpatched, DeepSpeed's comm backend would compile its shm op on start (tens of seconds)."""
    import importlib

    import deepspeed
    from deepspeed.accelerator import get_accelerator

    ds_torch = importlib.import_module("deepspeed.comm.torch")  # `deepspeed.comm.torch` the attribute is torch

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    assert builder is not None and deepspeed.ops.__compatible_ops__.get(builder.NAME, False)
    cpu.apply(only=("deepspeed_shm_op",))
    assert ds_torch.build_shm_op() is None


def causal_softmax(scores: torch.Tensor) -> torch.Tensor:
    from megatron.core.fusions.fused_softmax import FusedScaleMaskSoftmax
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.utils import attention_mask_func

    softmax = FusedScaleMaskSoftmax(
        input_in_fp16=False, input_in_bf16=False, attn_mask_type=AttnMaskType.causal,
        scaled_masked_softmax_fusion=False, mask_func=attention_mask_func, softmax_in_fp32=True, scale=None,
    )
    return softmax(scores, None)


def test_causal_mask(unpatched: None) -> None:
    scores = torch.randn(1, 2, 5, 5)
    with pytest.raises(CUDA_MISSING, match="CUDA"):
        causal_softmax(scores)

    cpu.apply(only=("causal_mask",))
    probs = causal_softmax(scores)
    future = torch.triu(torch.ones(5, 5, dtype=torch.bool), diagonal=1)
    expected = torch.softmax(scores.masked_fill(future, float("-inf")), dim=-1)
    torch.testing.assert_close(probs, expected)


def test_apply_is_idempotent_and_remove_restores(unpatched: None) -> None:
    original = torch.cuda.current_device
    cpu.apply()
    patched = torch.cuda.current_device
    cpu.apply()
    assert torch.cuda.current_device is patched is not original
    cpu.remove()
    assert torch.cuda.current_device is original and not cpu.applied()


@pytest.fixture
def world_of_one() -> Iterator[None]:
    import socket

    import torch.distributed as dist
    from megatron.core import parallel_state

    owned = not dist.is_initialized()
    if owned:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    parallel_state.initialize_model_parallel()
    yield
    parallel_state.destroy_model_parallel()
    if owned:
        dist.destroy_process_group()


def test_schedule_counter(unpatched: None, world_of_one: None) -> None:
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron.core.enums import ModelType

    model = torch.nn.Linear(4, 1)
    model.config = TransformerConfig(num_layers=1, hidden_size=8, num_attention_heads=1)
    model.model_type = ModelType.encoder_or_decoder
    model.set_input_tensor = lambda tensor: None
    batches = [torch.ones(2, 4)]

    def forward_step(data_iterator, net):
        out = net(next(data_iterator)).sum()
        return out, lambda o: (o, {"loss": o.detach().clone()})

    def run():
        return get_forward_backward_func()(forward_step_func=forward_step, data_iterator=iter(batches),
                                           model=[model], num_microbatches=1, seq_length=1, micro_batch_size=2,
                                           forward_only=False)

    with pytest.raises(CUDA_MISSING, match="CUDA"):
        run()
    cpu.apply(only=("schedule_counter",))
    (loss,) = run()
    assert model.weight.grad is not None and torch.equal(model.weight.grad, torch.full((1, 4), 2.0))


def test_tied_stage_copy(unpatched: None, world_of_one: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """The last stage's copy of a tied embedding at PP > 1 (megatron moves it to "cuda" first)."""
    from types import SimpleNamespace

    import torch.distributed as dist
    from megatron.core.models.common.language_module import language_module as lm

    monkeypatch.setattr(lm, "is_pp_first_stage", lambda group: False)  # this rank plays the last stage
    weight = torch.nn.Parameter(torch.ones(3, 2))
    stage = SimpleNamespace(pre_process=False, post_process=True, share_embeddings_and_output_weights=True,
                            output_layer=SimpleNamespace(weight=weight), vp_stage=None, vp_size=None,
                            pp_group=dist.group.WORLD, embd_group=dist.group.WORLD,
                            config=SimpleNamespace(pipeline_model_parallel_size=2, mtp_num_layers=0),
                            shared_embedding_or_output_weight=lambda: weight, _is_in_embd_group=lambda: True)
    with pytest.raises(CUDA_MISSING, match="CUDA"):
        lm.LanguageModule.setup_embeddings_and_output_layer(stage)
    cpu.apply(only=("tied_stage_copy",))
    weight.data.fill_(1.0)
    lm.LanguageModule.setup_embeddings_and_output_layer(stage)
    # Zeroed, then all-reduced from the first stage (alone here), on the CPU.
    assert weight.device.type == "cpu" and weight.shared and torch.equal(weight.data, torch.zeros(3, 2))
