"""The configuration's schema: typed dataclass sections, each key with its default and one-line
help, and the validation of values and of combinations of them (`RunConfig.validate`).

How user input becomes a `RunConfig` (YAML, dotted overrides, conversion) is `config.loading`;
both are re-exported by `mlra_mega.config`. Errors are `ConfigError`s that name the field and the fix.
"""

from __future__ import annotations

import dataclasses
import difflib
import keyword
import math
import reprlib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

from mlra_mega.errors import ConfigError

__all__ = [
    "ConfigError", "MLRAConfig", "ModelConfig", "ParallelConfig", "ZeroConfig", "OptimConfig", "TrainConfig",
    "DataConfig", "MetricsConfig", "EvalConfig", "DiagnosticsConfig", "CheckpointConfig", "FaultsConfig",
    "TrackingConfig", "ProfileConfig", "RunSection", "RunConfig", "check_tensor_parallel", "check_pipeline",
    "pipeline_split", "coalesced_reduction", "check_choices", "check_run_inputs",
    "check_path_component", "describe_keys", "option", "key_of", "field_of",
]

MLRA_PROJECTIONS = ("q", "k", "v", "o")


def option(default: Any, help: str) -> Any:
    """A field with a default and its one-line help (listed by `mlra-mega config --keys`)."""
    return field(default=default, metadata={"help": help})


# --------------------------------------------------------------------------- sections


@dataclass
class MLRAConfig:
    """Multi-head Low-Rank Attention: W_h = A_h B_h for each factorized projection."""

    rank: int | None = option(None, "rank r of each head's factors (null: d_head)")
    factorize: list[str] = field(default_factory=lambda: ["q", "k", "v"], metadata={
        "help": "projections factored per head as A_h B_h: a subset of q, k, v, o"})

    def validate(self, prefix: str = "model.mlra") -> None:
        if self.rank is not None and self.rank < 1:
            raise ConfigError(f"{prefix}.rank", f"must be >= 1, got {self.rank}",
                              "use a positive rank, or null for d_head")
        if not self.factorize:
            raise ConfigError(f"{prefix}.factorize", "is empty",
                              "list at least one of q, k, v, o")
        for name in self.factorize:
            if name not in MLRA_PROJECTIONS:
                raise ConfigError(f"{prefix}.factorize", f"unknown projection {name!r}",
                                  f"use a subset of {list(MLRA_PROJECTIONS)}{_did_you_mean(name, MLRA_PROJECTIONS)}")
        if len(set(self.factorize)) != len(self.factorize):
            raise ConfigError(f"{prefix}.factorize", f"lists a projection twice: {self.factorize}",
                              "name each of q, k, v, o at most once")


@dataclass
class ModelConfig:
    """Pre-LN decoder: GPT-2 blocks (the paper's) or Llama-style blocks (`arch`); `attention` and
    `embedding` pick the paper's variant."""

    arch: Literal["gpt2", "llama"] = option(
        "gpt2", "gpt2 (LayerNorm, GELU MLP, learned positions, biases) or llama (RMSNorm, SwiGLU, rotary "
                "positions, no biases, grouped-query attention)")
    num_layers: int = option(12, "transformer layers")
    hidden_size: int = option(768, "model width d")
    num_heads: int = option(12, "attention heads (divide hidden_size, and divide over parallel.tensor)")
    num_kv_heads: int | None = option(None, "key/value heads, llama only (null: num_heads = MHA; 1 = multi-query; "
                                            "divides num_heads and is divided by parallel.tensor)")
    ffn_hidden_size: int | None = option(None, "MLP width (null: gpt2 4 * hidden_size; llama 8/3 * hidden_size "
                                               "rounded up to a multiple of 256)")
    vocab_size: int | None = option(None, "vocabulary size (null: the tokenizer card's)")
    vocab_multiple: int = option(128, "the vocabulary is padded to a multiple of this (independent of TP)")
    seq_length: int = option(1024, "tokens per training sample")
    max_position_embeddings: int | None = option(None, "learned positions, gpt2; the longest context (null: "
                                                       "seq_length)")
    rotary_base: float = option(10000.0, "rotary embedding base (llama)")
    attention: Literal["mha", "mlra"] = option("mha", "mha (standard) or mlra (multi-head low-rank)")
    embedding: Literal["vanilla", "scaled", "layernorm"] = option(
        "vanilla", "vanilla, scaled (x sqrt(d), Scaled Embed) or layernorm (Embed LN)")
    mlra: MLRAConfig = field(default_factory=MLRAConfig, metadata={"help": "MLRA's rank and factored projections"})
    init_std: float = option(0.02, "normal init std of every weight matrix")
    qkv_init_std: float | None = option(None, "init std of Q, K, V (null: init_std)")
    scale_residual_init: bool = option(True, "output projections of residual branches * 1/sqrt(2L)")
    tie_embeddings: bool | None = option(None, "share the input embedding with the output head (null: gpt2 "
                                               "ties, llama does not)")
    layernorm_eps: float = option(1e-5, "epsilon of every norm (LayerNorm, or RMSNorm with llama)")
    hidden_dropout: float = option(0.0, "dropout on the residual branches")
    attention_dropout: float = option(0.0, "dropout on the attention probabilities")
    attention_backend: Literal["auto", "local", "sdpa", "te"] = option(
        "auto", "auto, local (megatron's), sdpa (torch) or te (Transformer Engine)")
    fusions: Literal["auto", "off"] = option("auto", "auto: megatron's fused kernels where available; off: none")
    init_from: str | None = option(None, "start from Hugging Face weights (GPT-2 for gpt2, Llama for llama): a "
                                         "directory with config.json and safetensors (MLRA: each head's truncated "
                                         "SVD)")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads

    @property
    def ffn_size(self) -> int:
        if self.ffn_hidden_size:
            return self.ffn_hidden_size
        if self.arch == "llama":  # Llama's 2/3 of 4d for the three SwiGLU matrices, rounded up to 256
            return 256 * math.ceil(8 * self.hidden_size / 3 / 256)
        return 4 * self.hidden_size

    @property
    def tied_embeddings(self) -> bool:
        """`tie_embeddings`, or the block type's default: gpt2 ties, llama does not."""
        return self.arch == "gpt2" if self.tie_embeddings is None else self.tie_embeddings

    @property
    def learned_positions(self) -> bool:
        """gpt2 adds a learned position embedding; llama rotates q and k instead."""
        return self.arch == "gpt2"

    @property
    def max_positions(self) -> int:
        return self.max_position_embeddings or self.seq_length

    @property
    def mlra_rank(self) -> int:
        return self.mlra.rank or self.head_dim

    @property
    def padded_vocab_size(self) -> int:
        """ceil(V / m) * m: independent of TP, so every TP size computes the same function."""
        if self.vocab_size is None:
            raise ConfigError("model.vocab_size", "is not set",
                              "set model.vocab_size or give a tokenizer whose card has it")
        return math.ceil(self.vocab_size / self.vocab_multiple) * self.vocab_multiple

    def validate(self, prefix: str = "model") -> None:
        check_choices(self, prefix)
        for name in ("num_layers", "hidden_size", "num_heads", "vocab_multiple", "seq_length"):
            _require_positive(f"{prefix}.{name}", getattr(self, name))
        for name in ("ffn_hidden_size", "vocab_size", "max_position_embeddings", "num_kv_heads"):
            if getattr(self, name) is not None:
                _require_positive(f"{prefix}.{name}", getattr(self, name))
        if self.hidden_size % self.num_heads:
            raise ConfigError(f"{prefix}.num_heads",
                              f"{self.num_heads} heads do not divide hidden_size {self.hidden_size}",
                              "choose num_heads dividing hidden_size (e.g. hidden 768 with 12 heads)")
        if self.num_kv_heads is not None and self.num_kv_heads != self.num_heads:
            if self.arch != "llama":
                raise ConfigError(f"{prefix}.num_kv_heads", "grouped-query attention is a llama-block option",
                                  "set model.arch=llama, or leave model.num_kv_heads null")
            if self.num_heads % self.num_kv_heads:
                raise ConfigError(f"{prefix}.num_kv_heads",
                                  f"{self.num_kv_heads} key/value heads do not divide num_heads {self.num_heads}",
                                  "choose a divisor of num_heads (1 = multi-query, num_heads = MHA)")
        if self.arch == "llama" and self.head_dim % 2:
            raise ConfigError(f"{prefix}.num_heads", f"rotary positions need an even head size, got "
                              f"{self.hidden_size} / {self.num_heads} = {self.head_dim}",
                              "choose num_heads so that hidden_size / num_heads is even")
        if not self.rotary_base > 0:
            raise ConfigError(f"{prefix}.rotary_base", f"must be > 0, got {self.rotary_base}",
                              "use Llama's 10000 (or 500000 for long contexts)")
        if self.max_positions < self.seq_length:
            raise ConfigError(f"{prefix}.max_position_embeddings",
                              f"{self.max_positions} is shorter than seq_length {self.seq_length}",
                              "set max_position_embeddings >= seq_length, or leave it null")
        for name in ("init_std", "layernorm_eps"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{prefix}.{name}", f"must be > 0, got {getattr(self, name)}",
                                  "use a small positive number")
        if self.qkv_init_std is not None and not self.qkv_init_std > 0:
            raise ConfigError(f"{prefix}.qkv_init_std", f"must be > 0, got {self.qkv_init_std}",
                              "use a small positive number, or null for init_std")
        for name in ("hidden_dropout", "attention_dropout"):
            p = getattr(self, name)
            if not 0.0 <= p < 1.0:
                raise ConfigError(f"{prefix}.{name}", f"must be in [0, 1), got {p}",
                                  "use a probability such as 0.1, or 0 for none")
        self.mlra.validate(f"{prefix}.mlra")


@dataclass
class ParallelConfig:
    """Tensor parallelism inside a node, pipeline stages across; data parallelism is the rest
    (world size / (tensor x pipeline))."""

    tensor: int = option(1, "tensor-parallel size (data parallelism is world size / (tensor x pipeline))")
    sequence_parallel: bool = option(False, "shard norms and dropout over the sequence (needs tensor >= 2)")
    pipeline: int = option(1, "pipeline stages (megatron-core's 1F1B schedule over the step's micro-batches; "
                              "needs zero.stage=1)")
    pipeline_layers: list[int] | None = option(
        None, "[first, last]: transformer layers on the first and last stage when the layers do not split "
              "evenly (the middle stages share the rest evenly)")
    # torch.distributed backend: auto = NCCL with GPUs, else gloo. gloo with GPUs keeps tensors on
    # the GPU and lets several ranks share one (NCCL refuses that): for tests on one GPU.
    backend: Literal["auto", "nccl", "gloo"] = option(
        "auto", "process-group backend: auto (NCCL with GPUs, else gloo), nccl or gloo")

    def validate(self, prefix: str = "parallel") -> None:
        _require_positive(f"{prefix}.tensor", self.tensor)
        _require_positive(f"{prefix}.pipeline", self.pipeline)
        if self.pipeline_layers is not None:
            pl = self.pipeline_layers
            if self.pipeline == 1:
                raise ConfigError(f"{prefix}.pipeline_layers", "is set but parallel.pipeline is 1",
                                  "set parallel.pipeline >= 2, or remove parallel.pipeline_layers")
            if len(pl) != 2 or any(not isinstance(n, int) or isinstance(n, bool) or n < 1 for n in pl):
                raise ConfigError(f"{prefix}.pipeline_layers", f"{_show(pl)} is not two positive layer counts",
                                  "give [layers on the first stage, layers on the last stage], e.g. [3, 3]")
        if self.sequence_parallel and self.tensor == 1:
            raise ConfigError(f"{prefix}.sequence_parallel", "needs tensor parallelism (parallel.tensor is 1)",
                              "set parallel.tensor >= 2 or parallel.sequence_parallel=false")


@dataclass
class ZeroConfig:
    """DeepSpeed ZeRO over the data-parallel group; `template` is a ds_configs/ JSON."""

    stage: int = option(1, "DeepSpeed ZeRO stage 0-3 over the data-parallel group")
    template: str | None = option(None, "a DeepSpeed JSON for fields not modelled here (ours win where both set one)")
    # Chosen by bench/comm.py's settings table (docs/performance.md section 10), set here so that
    # every run's deepspeed.json and MLflow params record them.
    overlap_comm: bool = option(False, "DeepSpeed reduces gradient buckets while the backward goes on (ZeRO 1-3)")
    reduce_bucket_size: int = option(500_000_000, "elements per DeepSpeed gradient-reduction bucket")
    allgather_bucket_size: int = option(500_000_000, "elements per DeepSpeed parameter all-gather bucket (ZeRO 1-2)")
    # ZeRO-2/3 reduce each gradient over DP in the backward that makes it (every micro-batch) and
    # keep only their partition; coalesced, gradients stay whole on each rank until the step's one
    # reduction (DeepSpeed's engine.coalesce_grad_reduction). auto: where sequence parallelism
    # needs it (its partial gradients are summed over TP, in one call, before DP reduces them).
    coalesce_reduction: Literal["auto", "on", "off"] = option(
        "auto", "ZeRO-2/3: one DP gradient reduction per step (on), per micro-batch (off), on under sequence parallelism (auto)")

    def validate(self, prefix: str = "zero") -> None:
        if self.stage not in (0, 1, 2, 3):
            raise ConfigError(f"{prefix}.stage", f"must be 0, 1, 2 or 3, got {self.stage}",
                              "pick a ZeRO stage from 0 to 3")
        for name in ("reduce_bucket_size", "allgather_bucket_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{prefix}.{name}", f"must be >= 1 element, got {getattr(self, name)}",
                                  "give a bucket size in elements, e.g. 500000000")


@dataclass
class OptimConfig:
    """AdamW with warm-up and a decay schedule, gradient clipping by global norm."""

    lr: float = option(3e-4, "peak learning rate of AdamW")
    min_lr: float = option(0.0, "the schedule's floor (absolute)")
    min_lr_ratio: float | None = option(None, "the floor as a fraction of lr (replaces min_lr): 0.1 = cosine to 10%")
    weight_decay: float = option(0.1, "AdamW weight decay on matrices (biases and norms are exempt)")
    betas: tuple[float, float] = option((0.9, 0.95), "AdamW betas")
    eps: float = option(1e-8, "AdamW epsilon")
    clip_grad: float = option(1.0, "0: no clipping")
    warmup_steps: int = option(0, "linear warm-up steps")
    schedule: Literal["cosine", "linear", "constant"] = option(
        "cosine", "decay after warm-up: cosine, linear or constant")
    # torch's fused AdamW kernel (CUDA, and CPU): one pass over each tensor, no DeepSpeed op built.
    # On by default: over ZeRO's 67M-element flat partition of gpt2-small-4l on 2 CPU threads it
    # takes 47 ms a step against 290 ms for the single-tensor loop and 230 ms for foreach
    # (docs/performance.md section 11); it rounds differently (the losses of 8 steps within 2e-6, bench/losses.py).
    fused: bool = option(True, "torch's fused AdamW kernel (false: torch's default, foreach on GPUs)")

    def validate(self, prefix: str = "optim") -> None:
        if not self.lr > 0:
            raise ConfigError(f"{prefix}.lr", f"must be > 0, got {self.lr}", "use e.g. 3e-4")
        if not 0 <= self.min_lr <= self.lr:
            raise ConfigError(f"{prefix}.min_lr", f"must be in [0, lr={self.lr}], got {self.min_lr}",
                              "use a value between 0 and optim.lr")
        if self.min_lr_ratio is not None:
            if not 0 <= self.min_lr_ratio <= 1:
                raise ConfigError(f"{prefix}.min_lr_ratio", f"must be in [0, 1], got {self.min_lr_ratio}",
                                  "give the floor as a fraction of optim.lr, e.g. 0.1")
            if self.min_lr:
                raise ConfigError(f"{prefix}.min_lr_ratio", f"is set together with min_lr={self.min_lr}",
                                  "set one of optim.min_lr and optim.min_lr_ratio")
        for i, b in enumerate(self.betas):
            if not 0 <= b < 1:
                raise ConfigError(f"{prefix}.betas", f"beta{i + 1} must be in [0, 1), got {b}",
                                  "use e.g. [0.9, 0.95]")
        if not self.eps > 0:
            raise ConfigError(f"{prefix}.eps", f"must be > 0, got {self.eps}", "use e.g. 1e-8")
        for name in ("weight_decay", "clip_grad", "warmup_steps"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{prefix}.{name}", f"must be >= 0, got {getattr(self, name)}",
                                  "use 0 to turn it off")


@dataclass
class TrainConfig:
    """Length, batch sizes, seed and numerics of the run."""

    steps: int = option(100, "optimizer steps of the run")
    global_batch_size: int = option(8, "samples per optimizer step, over all data-parallel ranks")
    micro_batch_size: int = option(8, "samples per forward/backward on one rank (the rest is accumulation)")
    seed: int = option(1234, "seed of initialisation, dropout and (by default) the data order")
    precision: Literal["fp32", "bf16"] = option("fp32", "fp32 or bf16")
    recompute: Literal["none", "full", "selective"] = option(
        "none", "activations recomputed in the backward: none, full (whole layers) or selective (core attention)")
    recompute_method: Literal["uniform", "block"] = option(
        "uniform", "with recompute=full: uniform (every group of recompute_num_layers) or block (the first N per stage)")
    recompute_num_layers: int = option(1, "with recompute=full: layers per recomputed group (uniform) or recomputed (block)")
    log_interval: int = option(1, "print a step line every this many steps")
    stop_at: int | None = option(None, "stop after this step with a checkpoint, to continue later (chunked runs)")
    max_consecutive_skips: int = option(0, "after this many non-finite steps in a row, roll back (0 = never)")

    def validate(self, prefix: str = "train") -> None:
        for name in ("steps", "global_batch_size", "micro_batch_size", "log_interval", "recompute_num_layers"):
            _require_positive(f"{prefix}.{name}", getattr(self, name))
        _check_seed(f"{prefix}.seed", self.seed)
        if self.max_consecutive_skips < 0:
            raise ConfigError(f"{prefix}.max_consecutive_skips", f"must be >= 0, got {self.max_consecutive_skips}",
                              "use 0 to only skip non-finite steps, or N to roll back after N in a row")
        if self.stop_at is not None and not 1 <= self.stop_at <= self.steps:
            raise ConfigError(f"{prefix}.stop_at", f"must be in [1, train.steps={self.steps}], got {self.stop_at}",
                              "give a step to stop after, or null to run to the end")
        if self.global_batch_size % self.micro_batch_size:
            raise ConfigError(f"{prefix}.global_batch_size",
                              f"{self.global_batch_size} is not a multiple of micro_batch_size {self.micro_batch_size}",
                              "make global_batch_size = micro_batch_size * data-parallel size * accumulation steps")


@dataclass
class DataConfig:
    """Tokenizer and a blend of indexed datasets (prefixes made by `mlra-mega preprocess`)."""

    tokenizer: str | None = option(None, "a directory made by `mlra-mega tokenizer train`, a sentencepiece .model, "
                                         "or a Hugging Face tokenizer.json (or its directory)")
    eod_id: int | None = option(None, "end-of-document id, for a tokenizer that has none of its own")
    paths: list[str] = field(
        default_factory=list, metadata={"help": "dataset prefixes made by `mlra-mega preprocess` (a blend)"})
    weights: list[float] | None = option(None, "blend weights, one per path (null: in proportion to size)")
    split: str = option("98,1,1", "train, valid, test weights over documents")
    seed: int | None = option(None, "seed of the data order (null: train.seed)")
    cache_dir: str | None = option(None, "megatron's index cache; None: ~/.cache/mlra_mega/index")
    num_workers: int = option(2, "DataLoader worker processes per rank reading batches ahead of the step "
                                 "(0: read in the step)")
    prefetch_factor: int = option(2, "global batches each worker reads ahead")

    def validate(self, prefix: str = "data") -> None:
        if self.num_workers < 0:
            raise ConfigError(f"{prefix}.num_workers", f"must be >= 0, got {self.num_workers}",
                              "use 0 to read batches in the step, or N worker processes")
        if self.prefetch_factor < 1:
            raise ConfigError(f"{prefix}.prefetch_factor", f"must be >= 1, got {self.prefetch_factor}",
                              "give the global batches each worker reads ahead, e.g. 2")
        if self.seed is not None:
            _check_seed(f"{prefix}.seed", self.seed)
        if self.weights is not None:
            if any(not w > 0 for w in self.weights):
                raise ConfigError(f"{prefix}.weights", f"must all be > 0, got {self.weights}",
                                  "give positive blend weights, or null")
            if self.paths and len(self.weights) != len(self.paths):
                raise ConfigError(f"{prefix}.weights", f"{len(self.weights)} weights for {len(self.paths)} paths",
                                  "give one weight per path, or null")


@dataclass
class MetricsConfig:
    """Per-step statistics: TEV every `tev_interval` steps (0 = off), MFU against a peak."""

    tev_interval: int = option(1, "TEV every this many steps (0 = off)")
    peak_tflops: float | None = option(None, "the accelerator's peak TFLOP/s, for MFU (null: no MFU)")
    comm_interval: int = option(0, "the communication ledger every N steps: comm/<group>/bytes, calls and "
                                   "time_s of that step (0 = off: nothing is wrapped)")
    memory_interval: int = option(1, "peak host / accelerator memory over the ranks every N steps: "
                                     "perf/peak_host_gib, perf/peak_accel_gib and the rank of each (0 = off)")
    system_metrics: bool = option(True, "MLflow's system metrics (CPU, memory, GPU) from rank 0 of each node")
    system_metrics_interval_s: float = option(10.0, "seconds between two system-metrics samples")

    def validate(self, prefix: str = "metrics") -> None:
        if not self.system_metrics_interval_s > 0:
            raise ConfigError(f"{prefix}.system_metrics_interval_s", f"must be > 0, got {self.system_metrics_interval_s}",
                              "give the seconds between two samples, e.g. 10")
        for name in ("tev_interval", "comm_interval", "memory_interval"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{prefix}.{name}", f"must be >= 0, got {getattr(self, name)}",
                                  "use 0 to turn it off, or N to record it every N steps")
        if self.peak_tflops is not None and not self.peak_tflops > 0:
            raise ConfigError(f"{prefix}.peak_tflops", f"must be > 0, got {self.peak_tflops}",
                              "give the accelerator's peak TFLOP/s, or null")


@dataclass
class DiagnosticsConfig:
    """Stability instruments, logged with the step's metrics (all off or cheap by default)."""

    interval: int = option(0, "per-layer gradient / parameter norms and residual variance every N steps (0 = off)")
    layers: list[int] | None = option(None, "transformer layers to report (None = all); embedding and head always")
    spike_window: int = option(100, "loss spike score: z against the trailing N steps")
    spike_threshold: float = option(6.0, "a spike is z above this")
    spike_min_history: int = option(20, "steps in the window before scores start")
    tev_jump: float = option(0.1, "alert when TEV mean moves by more than this fraction between measurements")
    grad_variance_interval: int = option(
        0, "gradient variance across micro-batches every N steps (expensive; ZeRO 0/1)")

    def validate(self, prefix: str = "diagnostics") -> None:
        for name in ("interval", "grad_variance_interval"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{prefix}.{name}", f"must be >= 0, got {getattr(self, name)}",
                                  "use 0 to turn it off, or N for every N steps")
        _require_positive(f"{prefix}.spike_window", self.spike_window)
        _require_positive(f"{prefix}.spike_min_history", self.spike_min_history)
        if not self.spike_threshold > 0 or not self.tev_jump > 0:
            raise ConfigError(f"{prefix}.spike_threshold" if not self.spike_threshold > 0 else f"{prefix}.tev_jump",
                              "must be > 0", "give a positive threshold")
        if self.layers is not None and any(i < 0 for i in self.layers):
            raise ConfigError(f"{prefix}.layers", f"layer indices must be >= 0, got {self.layers}",
                              "give 0-based layer indices, or null for all")


@dataclass
class EvalConfig:
    """Validation every `interval` steps (0 = off) over `iters` global batches (0 = the whole split)."""

    interval: int = option(0, "validate every this many steps (0 = off)")
    iters: int = option(10, "validation global batches (0 = the whole validation split)")
    tasks: list[str] = field(default_factory=list, metadata={
        "help": "lm-eval tasks run on the live model during training, logged as eval/<task>/<metric>"})
    tasks_interval: int = option(0, "run eval.tasks every this many steps (0 = at the end only)")
    tasks_include_path: str | None = option(None, "a folder of local lm-eval task YAML files (configs/eval_tasks)")
    tasks_limit: int | None = option(None, "at most this many documents per task (null: all)")

    def validate(self, prefix: str = "eval") -> None:
        if self.interval < 0:
            raise ConfigError(f"{prefix}.interval", f"must be >= 0, got {self.interval}", "use 0 to turn it off")
        if self.iters < 0:
            raise ConfigError(f"{prefix}.iters", f"must be >= 0, got {self.iters}",
                              "give the number of validation batches, or 0 for the whole split")
        if self.tasks_interval < 0:
            raise ConfigError(f"{prefix}.tasks_interval", f"must be >= 0, got {self.tasks_interval}",
                              "use 0 to run eval.tasks at the end only")
        if self.tasks_limit is not None and self.tasks_limit < 1:
            raise ConfigError(f"{prefix}.tasks_limit", f"must be >= 1, got {self.tasks_limit}",
                              "give a number of documents per task, or null for all")


@dataclass
class CheckpointConfig:
    """Checkpoint every `interval` steps (0 = only at the end), keeping the last `keep`."""

    interval: int = option(0, "checkpoint every this many steps (0 = only at the end)")
    keep: int = option(2, "complete checkpoints kept")
    resume: str = option("auto", "auto: continue run.dir's newest complete checkpoint; never; or a path")
    sigterm_save_s: float = option(20.0, "on SIGTERM, save only if the last save took at most this long")
    verify: Literal["size", "sha256"] = option("size", "what a resume checks of each file: its size, or also its "
                                                       "sha256 (hashed at save, by the rank that wrote it)")
    async_: bool = option(False, "key checkpoint.async: interval checkpoints are written in the background while "
                                 "training goes on (the last one and a preemption's are written at once)")

    def validate(self, prefix: str = "checkpoint") -> None:
        if self.interval < 0:
            raise ConfigError(f"{prefix}.interval", f"must be >= 0, got {self.interval}", "use 0 for the end only")
        _require_positive(f"{prefix}.keep", self.keep)
        if not self.resume:
            raise ConfigError(f"{prefix}.resume", "is empty", "use auto, never, or a checkpoint path")


@dataclass
class FaultsConfig:
    """Drills and diagnosis: a gradient-poisoning drill, a hang drill, the hang watchdog, the
    dead-peer wait, the run-directory lock.

    The drill can also come from the environment: MLRA_INJECT_NAN=STEP[:RANK[:COUNT]].
    """

    inject_nan_step: int | None = option(None, "poison one rank's gradients from this step on (a drill)")
    inject_nan_rank: int = option(0, "the global rank whose gradients are poisoned")
    inject_nan_count: int = option(1, "how many steps in a row")
    watchdog_minutes: float = option(30.0, "dump every rank's stacks after this long without a finished step; 0 = off")
    inject_hang_step: int | None = option(None, "a drill: this step stalls (one rank's) for inject_hang_s seconds")
    inject_hang_rank: int = option(0, "the global rank the hang drill stalls")
    inject_hang_s: float = option(60.0, "how long the hang drill's step stalls")
    peer_timeout_s: float = option(60.0, "after a stop signal, how long to wait for the other ranks to agree")
    lock_stale_s: float = option(300.0, "a run-directory lock not renewed for this long is taken over")
    kill_in_save_step: int | None = option(None, "a drill: the process kills itself (SIGKILL) while writing this "
                                                 "step's checkpoint")

    def validate(self, prefix: str = "faults") -> None:
        if self.inject_nan_step is not None:
            _require_positive(f"{prefix}.inject_nan_step", self.inject_nan_step)
        _require_positive(f"{prefix}.inject_nan_count", self.inject_nan_count)
        if self.inject_nan_rank < 0:
            raise ConfigError(f"{prefix}.inject_nan_rank", f"must be >= 0, got {self.inject_nan_rank}",
                              "give the global rank to poison")
        if self.inject_hang_step is not None:
            _require_positive(f"{prefix}.inject_hang_step", self.inject_hang_step)
        if self.kill_in_save_step is not None:
            _require_positive(f"{prefix}.kill_in_save_step", self.kill_in_save_step)
        if self.inject_hang_rank < 0:
            raise ConfigError(f"{prefix}.inject_hang_rank", f"must be >= 0, got {self.inject_hang_rank}",
                              "give the global rank that stalls")
        if not self.inject_hang_s > 0:
            raise ConfigError(f"{prefix}.inject_hang_s", f"must be > 0, got {self.inject_hang_s}",
                              "give the seconds the drill's step stalls")
        if self.watchdog_minutes < 0:
            raise ConfigError(f"{prefix}.watchdog_minutes", f"must be >= 0, got {self.watchdog_minutes}",
                              "use 0 to turn the watchdog off")
        if not self.lock_stale_s > 0:
            raise ConfigError(f"{prefix}.lock_stale_s", f"must be > 0, got {self.lock_stale_s}",
                              "give the seconds after which a run-directory lock nobody renews is taken over")
        if not self.peer_timeout_s > 0:
            raise ConfigError(f"{prefix}.peer_timeout_s", f"must be > 0, got {self.peer_timeout_s}",
                              "give the seconds to wait for the other ranks after a signal")


@dataclass
class TrackingConfig:
    """MLflow: the embedded store under the runs root unless `uri` names a server."""

    enabled: bool = option(True, "log to MLflow (false: no MLflow at all)")
    uri: str | None = option(None, "tracking server or store (null: MLFLOW_TRACKING_URI, else the embedded store)")
    experiment: str = option("default", "MLflow experiment, also the run directory's parent name")
    final_flush_s: float = option(
        60.0, "at the end, how long to wait for an unreachable server before leaving a buffer")
    send_interval_s: float = option(2.0, "records are sent in one batch at most this often (each send costs CPU)")
    parent_run_id: str | None = option(None, "make this run a child of that MLflow run (sweeps set it)")
    tags: list[str] = field(default_factory=list, metadata={"help": "extra run tags, \"key=value\""})

    def validate(self, prefix: str = "tracking") -> None:
        check_path_component(f"{prefix}.experiment", self.experiment)
        if self.uri is not None and _has_control(self.uri):
            raise ConfigError(f"{prefix}.uri", "holds a control character (a newline?)", "give the URI on one line")
        bad = [t for t in self.tags if "=" not in t or not t.split("=", 1)[0].strip()]
        if bad:
            raise ConfigError(f"{prefix}.tags", f"{bad} are not key=value", "write each tag as key=value")
        if self.final_flush_s < 0:
            raise ConfigError(f"{prefix}.final_flush_s", f"must be >= 0, got {self.final_flush_s}",
                              "give the seconds to wait for the tracking server at the end of a run")
        if self.send_interval_s < 0:
            raise ConfigError(f"{prefix}.send_interval_s", f"must be >= 0, got {self.send_interval_s}",
                              "give the seconds between sends to the tracker (0: send every record at once)")


@dataclass
class ProfileConfig:
    """A torch profiler trace of steps `start` .. `start + steps - 1` (start 0 = off)."""

    start: int = option(0, "first profiled step (0 = no profile)")
    steps: int = option(3, "profiled steps")
    ranks: list[int] | None = field(default_factory=lambda: [0], metadata={"help": "None: every rank"})
    record_shapes: bool = option(False, "record operator input shapes in the trace")
    with_stack: bool = option(False, "Python stacks in the trace (slower, much bigger files)")

    def validate(self, prefix: str = "profile") -> None:
        if self.start < 0:
            raise ConfigError(f"{prefix}.start", f"must be >= 0, got {self.start}",
                              "use 0 for no profile, or the first step to trace")
        _require_positive(f"{prefix}.steps", self.steps)
        if self.ranks is not None and any(r < 0 for r in self.ranks):
            raise ConfigError(f"{prefix}.ranks", f"ranks must be >= 0, got {self.ranks}",
                              "give global ranks, or null for every rank")

    @property
    def last(self) -> int:
        return self.start + self.steps - 1


@dataclass
class RunSection:
    """Where the run's files go: `dir`, or `<root>/<experiment>/<name>`."""

    root: str = option("runs", "root of run directories and of the embedded MLflow store")
    name: str | None = option(None, "run directory name under <root>/<experiment> (null: a timestamp)")
    dir: str | None = option(None, "this run's directory (null: <root>/<experiment>/<name>)")

    def validate(self, prefix: str = "run") -> None:
        if self.name is not None:
            check_path_component(f"{prefix}.name", self.name)
        for name in ("root", "dir"):
            value = getattr(self, name)
            if value is not None and _has_control(value):
                raise ConfigError(f"{prefix}.{name}", f"{_show(value)} holds a control character (a newline?)",
                                  "give a plain path")


@dataclass
class RunConfig:
    """The whole configuration of one run."""

    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    zero: ZeroConfig = field(default_factory=ZeroConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    diagnostics: DiagnosticsConfig = field(default_factory=DiagnosticsConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    faults: FaultsConfig = field(default_factory=FaultsConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    profile: ProfileConfig = field(default_factory=ProfileConfig)
    run: RunSection = field(default_factory=RunSection)

    def validate(self) -> None:
        """Checks each section, then what needs two sections (sizes against parallelism)."""
        for f in dataclasses.fields(self):
            section = getattr(self, f.name)
            if hasattr(section, "validate"):
                section.validate(f.name)
        check_tensor_parallel(self.model, self.parallel.tensor)
        if self.profile.start and self.profile.start > self.train.steps:
            raise ConfigError("profile.start", f"step {self.profile.start} is after the last step "
                              f"(train.steps={self.train.steps})", "choose a step range inside the run, or 0 for none")
        d = self.diagnostics
        if d.layers is not None and any(i >= self.model.num_layers for i in d.layers):
            raise ConfigError("diagnostics.layers", f"{d.layers} names a layer the model does not have "
                              f"(model.num_layers={self.model.num_layers})", "give indices below model.num_layers")
        if d.grad_variance_interval and self.zero.stage >= 2:
            raise ConfigError("diagnostics.grad_variance_interval",
                              f"needs each micro-batch's gradient, which ZeRO-{self.zero.stage} reduces and "
                              "partitions during backward before it can be read",
                              "use zero.stage=0 or 1 for this diagnostic, or set it to 0")
        t = self.train
        if t.recompute == "full" and t.recompute_num_layers > self.model.num_layers:
            raise ConfigError("train.recompute_num_layers", f"{t.recompute_num_layers} is more than the model's "
                              f"{self.model.num_layers} layers", f"give 1 to {self.model.num_layers}")
        if self.parallel.pipeline > 1:
            check_pipeline(self)
        if self.eval.tasks and self.parallel.sequence_parallel:
            raise ConfigError("eval.tasks", "scores requests of any length, which sequence parallelism cannot split",
                              "set parallel.sequence_parallel=false, or evaluate a checkpoint with "
                              "`mlra-mega evaluate CHECKPOINT --tasks ...`")
        if self.eval.tasks and self.eval.tasks_interval > self.train.steps:
            raise ConfigError("eval.tasks_interval", f"{self.eval.tasks_interval} is after the last step "
                              f"(train.steps={self.train.steps})", "choose a smaller interval, or 0 for the end only")


def check_run_inputs(cfg: "RunConfig") -> None:
    """What a run reads besides its data, checked when it starts (not in `validate`: a checkpoint's
    saved config is validated again wherever it is read, where those paths need not exist)."""
    if cfg.model.init_from is not None and not (Path(cfg.model.init_from) / "config.json").is_file():
        raise ConfigError("model.init_from", f"{cfg.model.init_from} is not a Hugging Face model directory "
                          "(no config.json)", "give a directory saved by transformers' save_pretrained")
    e = cfg.eval
    if e.tasks_include_path is not None and not Path(e.tasks_include_path).is_dir():
        raise ConfigError("eval.tasks_include_path", f"{e.tasks_include_path} is not a directory",
                          "give the folder of the task YAML files, e.g. configs/eval_tasks")
    if e.tasks:
        from mlra_mega.lm_tasks import check_lm_eval

        check_lm_eval("eval.tasks")


def coalesced_reduction(mode: str, stage: int, sequence_parallel: bool) -> bool:
    """Whether ZeRO-2/3 reduce the gradients over DP once per step, in DeepSpeed's coalescing
    window (`zero.coalesce_reduction`), holding them whole on each rank until then."""
    return stage in (2, 3) and (mode == "on" or (mode == "auto" and sequence_parallel))


def pipeline_split(num_layers: int, pipeline: int, first_last: list[int] | None) -> list[int]:
    """Transformer layers per pipeline stage (a ConfigError naming the fix when they do not split)."""
    if first_last is None or pipeline == 1:
        if num_layers % pipeline:
            raise ConfigError("parallel.pipeline", f"{pipeline} stages do not split model.num_layers={num_layers} "
                              "evenly", f"choose a stage count dividing {num_layers}, or give "
                              "parallel.pipeline_layers=[first,last] for an uneven split")
        return [num_layers // pipeline] * pipeline
    first, last = first_last
    rest, middle = num_layers - first - last, pipeline - 2
    if rest < 0 or (middle == 0 and rest) or (middle and (rest < middle or rest % middle)):
        need = (f"first + last = {num_layers}" if middle == 0
                else f"{num_layers} - first - last to be a positive multiple of the {middle} middle stages")
        raise ConfigError("parallel.pipeline_layers", f"{first_last} does not split model.num_layers={num_layers} "
                          f"over {pipeline} stages", f"choose counts with {need}")
    return [first, *([rest // middle] * middle if middle else []), last]


def check_pipeline(cfg: "RunConfig") -> None:
    """What pipeline parallelism needs of the other sections."""
    pp = cfg.parallel.pipeline
    if cfg.zero.stage != 1:
        why = ("partitions gradients during backward, which the pipeline schedule's own backward bypasses"
               if cfg.zero.stage >= 2 else "clips with a norm that counts the stages' replicated parameters wrongly")
        raise ConfigError("zero.stage", f"ZeRO-{cfg.zero.stage} cannot combine with pipeline parallelism "
                          f"(parallel.pipeline={pp}): it {why}", "use zero.stage=1 with parallel.pipeline > 1")
    pipeline_split(cfg.model.num_layers, pp, cfg.parallel.pipeline_layers)
    if cfg.eval.tasks:
        raise ConfigError("eval.tasks", "needs the whole model's logits on each rank, which pipeline stages do not "
                          "have", "leave eval.tasks empty with parallel.pipeline > 1 and run `mlra-mega evaluate "
                          "CHECKPOINT --tasks ...` on a checkpoint")
    if cfg.diagnostics.grad_variance_interval:
        raise ConfigError("diagnostics.grad_variance_interval", "needs each micro-batch's gradient, which the "
                          "pipeline schedule interleaves with other micro-batches' backward",
                          "set it to 0 with parallel.pipeline > 1")


def check_tensor_parallel(model: ModelConfig, tp: int) -> None:
    """TP must split heads and the padded vocabulary evenly."""
    if tp < 1:
        raise ConfigError("parallel.tensor", f"must be >= 1, got {tp}", "use a positive whole number")
    if model.num_heads % tp:
        raise ConfigError("parallel.tensor", f"{tp} does not divide model.num_heads {model.num_heads}",
                          "choose a tensor-parallel size that divides the number of heads")
    if model.kv_heads % tp:
        raise ConfigError("parallel.tensor", f"{tp} does not divide model.num_kv_heads {model.kv_heads} "
                          "(each tensor-parallel rank holds whole key/value heads)",
                          f"set parallel.tensor to a divisor of {model.kv_heads}, or model.num_kv_heads to a "
                          f"multiple of {tp}")
    if model.vocab_size is not None and model.padded_vocab_size % tp:
        raise ConfigError("parallel.tensor",
                          f"{tp} does not divide the padded vocabulary {model.padded_vocab_size}",
                          "choose model.vocab_multiple as a multiple of parallel.tensor")


def check_choices(section: Any, prefix: str) -> None:
    """Literal-typed fields hold one of their choices (also for configs built in code)."""
    hints = typing.get_type_hints(type(section))
    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        if dataclasses.is_dataclass(value):
            check_choices(value, f"{prefix}.{key_of(f.name)}")
        elif typing.get_origin(hints[f.name]) is Literal and value not in typing.get_args(hints[f.name]):
            choices = list(typing.get_args(hints[f.name]))
            raise ConfigError(f"{prefix}.{key_of(f.name)}", f"{_show(value)} is not one of {choices}",
                              f"use one of {choices}{_did_you_mean(str(value), [str(c) for c in choices])}")


# --------------------------------------------------------------------------- helpers


def key_of(name: str) -> str:
    """A field's config key: its name, less the `_` that a Python keyword needs (async_ -> async)."""
    return name[:-1] if name.endswith("_") and keyword.iskeyword(name[:-1]) else name


def field_of(key: str) -> str:
    """The field that holds config key `key`."""
    return key + "_" if keyword.iskeyword(key) else key


_SHOW = reprlib.Repr()
_SHOW.maxstring = _SHOW.maxother = 120
_SHOW.maxlist = _SHOW.maxtuple = _SHOW.maxdict = 8
_SHOW.maxlevel = 3


def _show(value: Any) -> str:
    """A user's value as it is quoted in an error message: repr, cut to a bounded length."""
    return _SHOW.repr(value)


def _require_positive(name: str, value: int) -> None:
    if value < 1:
        raise ConfigError(name, f"must be >= 1, got {value}", "use a positive whole number")


def _has_control(text: str) -> bool:
    return any(ord(c) < 32 or ord(c) == 127 for c in text)


def check_path_component(name: str, value: str) -> None:
    """`value` names one directory inside its parent: no separator, no `..`, no control characters."""
    if not value or value in (".", "..") or "/" in value or "\\" in value or _has_control(value) or len(value) > 200:
        raise ConfigError(name, f"{_show(value)} is not a single directory name",
                          "use letters, digits, '.', '-' and '_' only (no '/', no '..', no newline), "
                          "or set run.dir for a path of your own")


def _check_seed(name: str, value: int) -> None:
    if not 0 <= value < 2**32:  # numpy's seeds and megatron's shuffles take 32-bit unsigned seeds
        raise ConfigError(name, f"must be in [0, 2**32), got {value}", "use a seed such as 1234")


def _did_you_mean(word: str, options: typing.Iterable[str]) -> str:
    match = difflib.get_close_matches(word, list(options), n=1, cutoff=0.5)
    return f"; did you mean {match[0]!r}?" if match else ""


def _all_dotted_keys(cls: type = RunConfig, prefix: str = "") -> list[str]:
    keys = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            keys.extend(_all_dotted_keys(hints[f.name], f"{prefix}{f.name}."))
        else:
            keys.append(f"{prefix}{key_of(f.name)}")
    return keys


def _type_name(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal:
        return "|".join(str(a) for a in args)
    if origin in (Union, types.UnionType):
        return " | ".join("null" if a is type(None) else _type_name(a) for a in args)
    if origin in (list, tuple):
        return f"{origin.__name__}[{', '.join(_type_name(a) for a in args if a is not Ellipsis)}]"
    return getattr(hint, "__name__", str(hint))


def describe_keys(cls: type = RunConfig, prefix: str = "") -> list[tuple[str, str, Any, str]]:
    """(dotted key, type, default, help) of every key, in the order of the dataclasses."""
    out = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            out.extend(describe_keys(hints[f.name], f"{prefix}{f.name}."))
            continue
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        out.append((f"{prefix}{key_of(f.name)}", _type_name(hints[f.name]), default, f.metadata.get("help", "")))
    return out
