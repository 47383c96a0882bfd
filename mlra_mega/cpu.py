"""The only place that adapts megatron-core and DeepSpeed to a machine without CUDA (gloo, CPU).

megatron-core 0.16.1 runs GPTModel on CPU at any tensor-parallel size (sequence parallelism
included) once three CUDA assumptions are redirected (two more for pipeline parallelism), and DeepSpeed
0.19.8 starts without a JIT build once a fourth is; `apply()` does exactly that and nothing else, and only when CUDA is
unavailable (`distributed.setup` calls it). Each shim has a canary test showing megatron-core's
or DeepSpeed's own call still fails (or still builds), so a shim a later release no longer needs
is noticed and removed.

1. RNG tracker: the tensor-parallel RNG tracker saves and restores CUDA generator states; on CPU
   the same bookkeeping is done on the CPU default generator, which dropout and init use there.
2. Current device: scratch buffers, sequence-parallel gathers and reduce-scatters are allocated
   on `torch.cuda.current_device()`, which without CUDA can only raise; it answers "cpu" instead.
   Nothing that worked before can break: on such a machine every call of it failed.
3. Default causal mask: the fallback softmax builds its causal mask on "cuda"; on CPU it is built
   on the CPU (same values).
4. DeepSpeed's shared-memory all-reduce op: DeepSpeed JIT-compiles it (tens of seconds) when its
   communication backend starts on CPU, for inference all-reduces we never make; it is skipped.
5. Pipeline schedules' token counter: every schedule in `pipeline_parallel/schedules.py`
   allocates `torch.zeros([], device="cuda")`; that module sees a `torch` whose `zeros` puts a
   "cuda" request on the CPU (every other name is torch's own).
6. Tied embeddings over pipeline stages: `LanguageModule.setup_embeddings_and_output_layer`
   moves the last stage's copy of the word embeddings to "cuda" before all-reducing it from the
   first stage; the same all-reduce is made where the weight is.
(p2p_communication's `torch.cuda.synchronize()` is not shimmed: the builder sets
`batch_p2p_sync` only where CUDA is.)

Fused kernels (softmax, bias-GELU, gradient-accumulation, RoPE) are not shims: they are turned
off by the model builder's `fusions` setting.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["apply", "remove", "applied", "needed", "SHIMS"]


@dataclass(frozen=True)
class _Patch:
    module: str
    attr: str
    make: Any  # () -> replacement


# --------------------------------------------------------------------------- 1. RNG tracker


def _cpu_get_rng_state(device: Any = None, clone: bool = False, graph_safe: bool = False) -> torch.Tensor:
    return torch.get_rng_state()


def _cpu_set_rng_state(new_state: torch.Tensor, device: Any = -1, graph_safe: bool = False) -> None:
    torch.set_rng_state(new_state)


def _make_cpu_tracker_class() -> type:
    from megatron.core.tensor_parallel import random as mp_random

    base = _ORIGINALS.get(("megatron.core.tensor_parallel.random", "CudaRNGStatesTracker"),
                          mp_random.CudaRNGStatesTracker)

    class CpuRNGStatesTracker(base):  # type: ignore[misc, valid-type]
        """megatron's RNG tracker, keeping named states of the CPU default generator."""

        def add(self, name: str, seed: int) -> None:
            self._is_initialized = True
            if seed in self.seeds_:
                raise Exception(f"seed {seed} already exists")
            self.seeds_.add(seed)
            if name in self.states_:
                raise Exception(f"rng state {name} already exists")
            orig = torch.get_rng_state()
            torch.manual_seed(seed)
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(orig)

        @contextlib.contextmanager
        def fork(self, name: str = mp_random._MODEL_PARALLEL_RNG_TRACKER_NAME) -> Iterator[None]:
            # The CUDA version warns when the CPU state changes inside a fork; on CPU that
            # change is the point, so this is the same swap without the warning.
            if name not in self.states_:
                raise Exception(f"rng state {name} is not added")
            orig_state = torch.get_rng_state()
            orig_name = self._current_state_name
            if orig_name != "default-rng":
                self.states_[orig_name] = orig_state
            torch.set_rng_state(self.states_[name])
            self._current_state_name = name
            try:
                yield
            finally:
                self.states_[name] = torch.get_rng_state()
                if orig_name != "default-rng":
                    orig_state = self.states_[orig_name]
                torch.set_rng_state(orig_state)
                self._current_state_name = orig_name

    return CpuRNGStatesTracker


def _reset_rng_tracker() -> None:
    # A tracker built before apply() (or by the CPU class before remove()) is dropped, so the
    # next initialize_rng_tracker() builds one of the class now in force.
    from megatron.core.tensor_parallel import random as mp_random

    mp_random._CUDA_RNG_STATE_TRACKER = None
    mp_random._CUDA_RNG_STATE_TRACKER_INITIALIZED = False


# --------------------------------------------------------------------------- 2. current device


def _cpu_current_device() -> str:
    return "cpu"


# --------------------------------------------------------------------------- 3. causal mask


@functools.lru_cache(maxsize=32)
def _cpu_default_causal_mask(sq: int) -> torch.Tensor:
    return torch.triu(torch.ones(sq, sq, dtype=torch.bool), diagonal=1)


# --------------------------------------------------------------------------- 4. DeepSpeed shm op


def _no_shm_op() -> None:
    return None


# --------------------------------------------------------------------------- 5. schedules' counter


def _cpu_torch_for_schedules() -> Any:
    import types

    class _Torch(types.ModuleType):
        def __getattr__(self, name: str) -> Any:
            return getattr(torch, name)

        @staticmethod
        def zeros(*args: Any, device: Any = None, **kwargs: Any) -> torch.Tensor:
            if device is not None and torch.device(device).type == "cuda":
                device = "cpu"
            return torch.zeros(*args, device=device, **kwargs)

    return _Torch("torch")


# --------------------------------------------------------------------------- 6. tied stage copy


def _make_cpu_setup_embeddings() -> Any:
    import torch.distributed as dist

    key = ("megatron.core.models.common.language_module.language_module",
           "LanguageModule.setup_embeddings_and_output_layer")
    original = _ORIGINALS[key]

    def setup_embeddings_and_output_layer(self: Any) -> None:
        in_group = self._is_in_embd_group()
        self._is_in_embd_group = lambda: False  # megatron's .cuda() and all-reduce are skipped ...
        try:
            original(self)
        finally:
            del self._is_in_embd_group
        if self.share_embeddings_and_output_weights and self.config.pipeline_model_parallel_size > 1 \
                and dist.is_initialized() and in_group:  # ... and made here, on the weight's device
            dist.all_reduce(self.shared_embedding_or_output_weight().data, group=self.embd_group)

    return setup_embeddings_and_output_layer


SHIMS: dict[str, tuple[_Patch, ...]] = {
    "rng_tracker": (
        _Patch("megatron.core.tensor_parallel.random", "CudaRNGStatesTracker", _make_cpu_tracker_class),
        _Patch("megatron.core.tensor_parallel.random", "_get_cuda_rng_state", lambda: _cpu_get_rng_state),
        _Patch("megatron.core.tensor_parallel.random", "_set_cuda_rng_state", lambda: _cpu_set_rng_state),
    ),
    "current_device": (
        _Patch("torch", "cuda.current_device", lambda: _cpu_current_device),
    ),
    "causal_mask": (
        _Patch("megatron.core.fusions.fused_softmax", "get_default_causal_mask", lambda: _cpu_default_causal_mask),
        _Patch("megatron.core.transformer.utils", "get_default_causal_mask", lambda: _cpu_default_causal_mask),
    ),
    "deepspeed_shm_op": (
        _Patch("deepspeed.comm.torch", "build_shm_op", lambda: _no_shm_op),
    ),
    "schedule_counter": (
        _Patch("megatron.core.pipeline_parallel.schedules", "torch", _cpu_torch_for_schedules),
    ),
    "tied_stage_copy": (
        _Patch("megatron.core.models.common.language_module.language_module",
               "LanguageModule.setup_embeddings_and_output_layer", _make_cpu_setup_embeddings),
    ),
}

_ORIGINALS: dict[tuple[str, str], Any] = {}


def _resolve(patch: _Patch) -> tuple[Any, str]:
    import importlib

    owner: Any = importlib.import_module(patch.module)
    *path, leaf = patch.attr.split(".")
    for part in path:
        owner = getattr(owner, part)
    return owner, leaf


def needed() -> bool:
    """True where the shims belong: no usable CUDA device."""
    return not torch.cuda.is_available()


def applied() -> bool:
    return bool(_ORIGINALS)


def apply(only: tuple[str, ...] | None = None) -> None:
    """Installs the shims (all, or the named ones); idempotent."""
    for name, patches in SHIMS.items():
        if only is not None and name not in only:
            continue
        for patch in patches:
            key = (patch.module, patch.attr)
            if key in _ORIGINALS:
                continue
            owner, leaf = _resolve(patch)
            _ORIGINALS[key] = getattr(owner, leaf)
            setattr(owner, leaf, patch.make())
        if name == "rng_tracker":
            _reset_rng_tracker()


def remove() -> None:
    """Restores megatron-core's own functions (tests use it to show a shim is still needed)."""
    for (module, attr), original in list(_ORIGINALS.items()):
        owner, leaf = _resolve(_Patch(module, attr, None))
        setattr(owner, leaf, original)
        del _ORIGINALS[(module, attr)]
    _reset_rng_tracker()
