"""`mlra-mega generate`: continue a prompt from a checkpoint or from a Hugging Face export.

A checkpoint (any TP x PP layout, any ZeRO stage) is read into one TP = 1 model in this process
(`export.load_checkpoint_model`, the TP shards merged) and runs on our own model path with
megatron-core's static KV cache, so every variant generates, Embed LN and tied Scaled Embed
included (they have no GPT-2 form). An exported directory runs on transformers' GPT-2 with its
own cache. Both go through one sampling loop: the prompt is encoded once, each step feeds only
the newest token, temperature 0 is greedy, `top_k` / `top_p` filter the distribution, the seed
makes sampling repeatable, and generation stops at the end-of-document id, at `max_new_tokens`
or at the model's context (its learned position embeddings end there).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from mlra_mega.config import ConfigError

__all__ = ["SamplingOptions", "load_source", "generate", "next_token"]


@dataclass
class SamplingOptions:
    max_new_tokens: int = 64
    temperature: float = 1.0  # 0: greedy
    top_k: int = 0  # 0: no limit
    top_p: float = 1.0
    seed: int = 0

    def validate(self) -> None:
        if self.max_new_tokens < 1:
            raise ConfigError("--max-new-tokens", f"must be >= 1, got {self.max_new_tokens}", "give a positive count")
        if self.temperature < 0:
            raise ConfigError("--temperature", f"must be >= 0, got {self.temperature}", "give 0 (greedy) or more")
        if self.top_k < 0:
            raise ConfigError("--top-k", f"must be >= 0, got {self.top_k}", "give 0 (no limit) or a count")
        if not 0 < self.top_p <= 1:
            raise ConfigError("--top-p", f"must be in (0, 1], got {self.top_p}", "give a probability mass such as 0.9")


def next_token(logits: Tensor, opts: SamplingOptions, generator: torch.Generator) -> int:
    """One token from the last position's logits [vocab]."""
    if opts.temperature == 0:
        return int(torch.argmax(logits))
    logits = logits.double() / opts.temperature
    if 0 < opts.top_k < logits.numel():
        kth = torch.topk(logits, opts.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if opts.top_p < 1:
        order = torch.argsort(logits, descending=True)
        probs = torch.softmax(logits[order], dim=0)
        # Keep the smallest head of the sorted distribution whose mass reaches top_p (at least one).
        drop = torch.cumsum(probs, dim=0) - probs >= opts.top_p
        logits = logits.clone()
        logits[order[drop]] = float("-inf")
    return int(torch.multinomial(torch.softmax(logits, dim=0), 1, generator=generator))


class MegatronLM:
    """Our model with megatron-core's static KV cache: `feed(ids)` -> the last position's logits;
    `logits(ids)` -> every position's, in one forward without the cache (for scoring). The model
    may be a live TP-sharded one: every TP rank then calls in the same order."""

    def __init__(self, model: torch.nn.Module, context: int, vocab: int) -> None:
        from megatron.core.inference.contexts import StaticInferenceContext

        self.model, self.context, self.vocab = model, context, vocab
        self.cache = StaticInferenceContext(max_batch_size=1, max_sequence_length=context)

    def feed(self, ids: list[int]) -> Tensor:
        start = self.cache.sequence_len_offset
        tokens = torch.tensor([ids], dtype=torch.long)
        positions = torch.arange(start, start + len(ids), dtype=torch.long).unsqueeze(0)
        if start > 0:
            self.cache.enable_decode_mode()
        logits = self.model(tokens, positions, None, inference_context=self.cache, runtime_gather_output=True)
        self.cache.sequence_len_offset += len(ids)
        return logits[0, -1, :self.vocab]  # the padding rows of the output layer are no tokens

    def logits(self, ids: list[int]) -> Tensor:
        tokens = torch.tensor([ids], dtype=torch.long, device=_device_of(self.model))
        positions = torch.arange(len(ids), dtype=torch.long, device=tokens.device).unsqueeze(0)
        # Every row of the output layer, padding included: it is the softmax training computes.
        return self.model(tokens, positions, None, runtime_gather_output=True)[0].float().cpu()


class _HFLM:
    """A transformers causal LM with its own cache, behind the same `feed`."""

    def __init__(self, model, context: int, vocab: int) -> None:
        import inspect

        self.model, self.context, self.vocab, self.past = model, context, vocab, None
        # transformers 5 renamed past_key_values to cache (4.x has only the old name).
        self.key = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

    def feed(self, ids: list[int]) -> Tensor:
        out = self.model(torch.tensor([ids], dtype=torch.long), use_cache=True, **{self.key: self.past})
        self.past = getattr(out, self.key)
        return out.logits[0, -1, :self.vocab]

    def logits(self, ids: list[int]) -> Tensor:
        return self.model(torch.tensor([ids], dtype=torch.long)).logits[0].float()


def _device_of(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


@dataclass
class TrackedRun:
    """The training run a checkpoint belongs to (evaluation logs into its MLflow run)."""

    dir: Path
    cfg: object  # its RunConfig


@dataclass
class Source:
    """A loaded model and what generation and evaluation need of it."""

    lm: object
    tokenizer: object
    eod: int
    context: int  # the most positions the model takes
    description: str
    seq_length: int = 0  # the training sequence length: evaluation's window (0: the context)
    step: int = 0  # the checkpoint's step (0 for an export)
    run: TrackedRun | None = None

    def __post_init__(self) -> None:
        self.seq_length = self.seq_length or self.context


def load_source(source: str | Path) -> Source:
    """A checkpoint (a step directory, a run's checkpoints/ or a run directory) or an exported
    Hugging Face directory (config.json beside the weights)."""
    from mlra_mega.data.tokenizer import load_tokenizer

    path = Path(source)
    if not path.exists():
        raise ConfigError("SOURCE", f"{source} does not exist",
                          "give a checkpoint, a run directory or an `mlra-mega export-hf` directory")
    if (path / "config.json").is_file():
        from transformers import AutoModelForCausalLM

        if not any((path / f).is_file() for f in ("tokenizer.model", "tokenizer.json")):
            raise ConfigError("SOURCE", f"{path} has no tokenizer.model or tokenizer.json",
                              "export it with `mlra-mega export-hf`")
        model = AutoModelForCausalLM.from_pretrained(path).float().eval()
        tok = load_tokenizer(path, getattr(model.config, "eos_token_id", None))
        # GPT-2 names its context n_positions; Llama (and most others) max_position_embeddings.
        context = int(getattr(model.config, "n_positions", None) or model.config.max_position_embeddings)
        return Source(_HFLM(model, context, tok.vocab_size), tok, tok.eod, context, f"{path} (Hugging Face)",
                      seq_length=int(getattr(model.config, "mlra_seq_length", context)))

    from mlra_mega.export import load_checkpoint_model
    from mlra_mega.train.checkpoint import read_sidecar

    model, cfg, ckpt = load_checkpoint_model(path)
    if not (ckpt.path / "tokenizer").is_dir():
        raise ConfigError("SOURCE", f"{ckpt.path} holds no tokenizer/ copy",
                          "generate from a checkpoint written by `mlra-mega train` (it copies the tokenizer)")
    tok = load_tokenizer(ckpt.path / "tokenizer")
    context = cfg.model.max_position_embeddings or cfg.model.seq_length
    return Source(MegatronLM(model, context, tok.vocab_size), tok, tok.eod, context,
                  f"{ckpt.path} ({cfg.model.arch} blocks, {cfg.model.attention}, {cfg.model.embedding} embedding, "
                  f"{cfg.model.num_layers} layers)",
                  seq_length=cfg.model.seq_length, step=int(read_sidecar(ckpt)["step"]),
                  run=TrackedRun(ckpt.root.parent, cfg))


@torch.no_grad()
def generate(src: Source, prompt: str, opts: SamplingOptions, log=None) -> list[int]:
    """The continuation's token ids (without the end-of-document id that stopped it)."""
    opts.validate()
    ids = src.tokenizer.encode_one(prompt)
    if not ids:
        raise ConfigError("--prompt", "the prompt encodes to no tokens", "give some text")
    if len(ids) >= src.context:
        raise ConfigError("--prompt", f"{len(ids)} tokens, the model's context is {src.context}",
                          f"give a prompt of fewer than {src.context} tokens")
    budget = min(opts.max_new_tokens, src.context - len(ids))
    if budget < opts.max_new_tokens and log is not None:
        log(f"[generate] {len(ids)} prompt tokens + {opts.max_new_tokens} would pass the context of "
            f"{src.context}: at most {budget} new tokens")
    generator = torch.Generator().manual_seed(opts.seed)
    out: list[int] = []
    logits = src.lm.feed(ids)
    while len(out) < budget:
        token = next_token(logits, opts, generator)
        if token == src.eod:
            break
        out.append(token)
        if len(out) < budget:
            logits = src.lm.feed([token])
    return out


def run(source: str, prompts: list[str], opts: SamplingOptions) -> list[str]:
    """Loads `source` once, prints and returns each prompt's continuation."""
    from mlra_mega import distributed
    from mlra_mega.config import ParallelConfig

    distributed.setup(ParallelConfig(tensor=1), seed=opts.seed)
    try:
        src = load_source(source)
        print(f"[generate] {src.description}", file=sys.stderr)
        texts = []
        for prompt in prompts:
            text = src.tokenizer.decode(generate(src, prompt, opts, log=lambda m: print(m, file=sys.stderr)))
            print(text, flush=True)
            texts.append(text)
        return texts
    finally:
        distributed.teardown()
