"""`model.init_from`: start a model from Hugging Face GPT-2 (gpt2 blocks) or Llama (llama blocks)
weights (continued pre-training).

The directory is read from safetensors only (`model.safetensors`, or the shards its index names):
no pickle is ever loaded. Its config must describe the model config's shape (layers, width,
heads, key/value heads, MLP width, positions, vocabulary, tied head, activation, rotary base, norm
epsilon); any difference is one line naming both values. The tensors map back onto our full (PP =
1, TP = 1) state dict, the inverse of `model.hf.hf_state_dict`: MHA loads exactly; an MLRA model
gets each head's factors (each key/value head's, for k and v) from a truncated SVD of that head's
projection at rank r (`convert.mha_to_mlra`), exact at r = d_head,
with the relative reconstruction error of every layer returned for the log. Rows of a padded
vocabulary that the directory lacks start as the mean of the real rows (a zero row would give
padding ids a logit far above a trained model's, which are strongly negative on average). Each
rank then copies the part of every tensor it holds: its TP shard of its pipeline stage's layers.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from torch import Tensor

from mlra_mega.config import ModelConfig
from mlra_mega.errors import ConfigError

__all__ = ["load_hf_weights", "read_hf", "init_from_hf"]

FIELD = "model.init_from"
# Hugging Face model_type of each block type, and the prefix of its body's tensors.
MODEL_TYPES = {"gpt2": ("gpt2", "transformer."), "llama": ("llama", "model.")}


def read_hf(path: str | Path, arch: str = "gpt2") -> tuple[dict, dict[str, Tensor]]:
    """(config.json, tensors) of a Hugging Face GPT-2 or Llama directory, through safetensors."""
    from safetensors.torch import load_file

    path = Path(path)
    model_type, prefix = MODEL_TYPES[arch]
    if not (path / "config.json").is_file():
        raise ConfigError(FIELD, f"{path} has no config.json", "give a directory saved by transformers' save_pretrained")
    config = json.loads((path / "config.json").read_text())
    if config.get("model_type") != model_type:
        other = next((a for a, (t, _) in MODEL_TYPES.items() if t == config.get("model_type")), None)
        raise ConfigError(FIELD, f"{path} holds a {config.get('model_type')!r} model, and model.arch is {arch}",
                          f"set model.arch={other} to start from it" if other
                          else f"give a {'Llama' if arch == 'llama' else 'GPT-2'} directory")
    index = path / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (path / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        pickles = sorted(p.name for p in path.glob("*.bin"))
        raise ConfigError(FIELD, f"{path} has no safetensors weights" + (f" (only {pickles[0]}, a pickle)" if pickles else ""),
                          "save it with save_pretrained(..., safe_serialization=True); pickled weights are never loaded")
    tensors: dict[str, Tensor] = {}
    for name in files:
        tensors.update(load_file(str(path / name)))
    # Some savers keep the "transformer." / "model." prefix, others drop it; lm_head may be left out when tied.
    return config, {(k if k.startswith((prefix, "lm_head.")) else f"{prefix}{k}"): v for k, v in tensors.items()}


def _check_llama_shape(config: dict, cfg: ModelConfig) -> None:
    heads = config.get("num_attention_heads")
    want = {"num_hidden_layers": (cfg.num_layers, "model.num_layers"),
            "hidden_size": (cfg.hidden_size, "model.hidden_size"),
            "num_attention_heads": (cfg.num_heads, "model.num_heads"),
            "num_key_value_heads": (cfg.kv_heads, "model.num_kv_heads"),
            "intermediate_size": (cfg.ffn_size, "model.ffn_hidden_size"),
            "tie_word_embeddings": (cfg.tied_embeddings, "model.tie_embeddings"),
            "rope_theta": (float(cfg.rotary_base), "model.rotary_base"),
            "rms_norm_eps": (cfg.layernorm_eps, "model.layernorm_eps")}
    have = dict(config)
    have.setdefault("num_key_value_heads", heads)
    have.setdefault("tie_word_embeddings", False)
    rope = have.get("rope_parameters") or have.get("rope_scaling") or {}
    have.setdefault("rope_theta", rope.get("rope_theta", 10000.0))
    have["rope_theta"] = float(have["rope_theta"])
    for key, (ours, field) in want.items():
        if have.get(key) != ours:
            raise ConfigError(field, f"is {ours}, but the {FIELD} model has {key}={have.get(key)}",
                              f"set {field}={have.get(key)} to start from these weights")
    checks = [(have.get("hidden_act", "silu") == "silu", f"activation {have.get('hidden_act')!r}; our MLP is SwiGLU"),
              (not have.get("attention_bias") and not have.get("mlp_bias"), "biases; llama blocks have none"),
              (rope.get("rope_type", "default") == "default", f"rope scaling {rope.get('rope_type')!r}; ours is plain RoPE"),
              (have.get("head_dim") in (None, cfg.head_dim), f"head_dim {have.get('head_dim')} != hidden_size / "
                                                              f"num_heads {cfg.head_dim}")]
    for ok, problem in checks:
        if not ok:
            raise ConfigError(FIELD, f"the model has {problem}", "start from a plain Llama directory (SwiGLU, "
                              "no biases, unscaled RoPE)")
    _check_vocab(have.get("vocab_size"), cfg)
    if have.get("max_position_embeddings", 0) < cfg.max_positions:
        raise ConfigError("model.seq_length", f"needs {cfg.max_positions} positions, the {FIELD} model has "
                          f"{have.get('max_position_embeddings')}",
                          f"set model.seq_length <= {have.get('max_position_embeddings')}")


def _check_vocab(vocab: int | None, cfg: ModelConfig) -> None:
    if vocab not in (cfg.vocab_size, cfg.padded_vocab_size):
        raise ConfigError("model.vocab_size", f"the {FIELD} model's vocabulary is {vocab}, ours is {cfg.vocab_size} "
                          f"(padded {cfg.padded_vocab_size})",
                          "train with the tokenizer those weights were trained with (data.tokenizer)")


def _check_shape(config: dict, cfg: ModelConfig) -> None:
    want = {"n_layer": (cfg.num_layers, "model.num_layers"), "n_embd": (cfg.hidden_size, "model.hidden_size"),
            "n_head": (cfg.num_heads, "model.num_heads"),
            "n_inner": (cfg.ffn_size, "model.ffn_hidden_size"),
            "tie_word_embeddings": (cfg.tied_embeddings, "model.tie_embeddings")}
    have = dict(config)
    if have.get("n_inner") is None:
        have["n_inner"] = 4 * have.get("n_embd", 0)
    have.setdefault("tie_word_embeddings", True)
    for key, (ours, field) in want.items():
        if have.get(key) != ours:
            raise ConfigError(field, f"is {ours}, but the {FIELD} model has {key}={have.get(key)}",
                              f"set {field}={have.get(key)} to start from these weights")
    if have.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
        raise ConfigError(FIELD, f"activation {have['activation_function']!r}; our MLP is GELU (tanh)",
                          "start from a GPT-2 with activation_function gelu_new")
    _check_vocab(have.get("vocab_size"), cfg)
    if have.get("n_positions", 0) < cfg.max_positions:
        raise ConfigError("model.seq_length", f"needs {cfg.max_positions} positions, the {FIELD} model has "
                          f"{have.get('n_positions')}", f"set model.seq_length <= {have.get('n_positions')}")


def _pad_rows(t: Tensor, rows: int) -> Tensor:
    if t.shape[0] == rows:
        return t
    return torch.cat([t, t.mean(dim=0, keepdim=True).expand(rows - t.shape[0], -1)])


def init_from_hf(path: str | Path, cfg: ModelConfig) -> tuple[dict[str, Tensor], list[float]]:
    """(our full PP = 1 state dict for `cfg`, relative SVD error per layer: empty for MHA)."""
    from mlra_mega.model.convert import mha_to_mlra

    if cfg.embedding == "scaled" and cfg.tied_embeddings:
        raise ConfigError("model.embedding", "Scaled Embed with tied embeddings cannot start from Hugging Face "
                          "weights: dividing the shared matrix by sqrt(d) would also scale the logits",
                          "use model.tie_embeddings=false with Scaled Embed")
    config, hf = read_hf(path, cfg.arch)
    t = {k: v.float() for k, v in hf.items()}
    if cfg.arch == "llama":
        _check_llama_shape(config, cfg)
        full = _llama_full(t, cfg)
    else:
        _check_shape(config, cfg)
        full = _gpt2_full(t, cfg)
    errors: list[float] = []
    if cfg.attention == "mlra":
        full, errors = mha_to_mlra(full, cfg)
    return {k: v.contiguous() for k, v in full.items()}, errors


def _llama_full(t: dict[str, Tensor], cfg: ModelConfig) -> dict[str, Tensor]:
    """Our full MHA state dict from Llama's tensors (the inverse of `hf._llama_state_dict`)."""
    from mlra_mega.model.convert import group_join
    from mlra_mega.model.hf import LLAMA_LAYER_NAMES

    d, dh, rows = cfg.hidden_size, cfg.head_dim, cfg.padded_vocab_size
    scale = math.sqrt(d) if cfg.embedding == "scaled" else 1.0
    full = {"embedding.word_embeddings.weight": _pad_rows(t["model.embed_tokens.weight"] / scale, rows),
            "decoder.final_layernorm.weight": t["model.norm.weight"]}
    if not cfg.tied_embeddings:
        full["output_layer.weight"] = _pad_rows(t["lm_head.weight"], rows)
    for i in range(cfg.num_layers):
        src, dst = f"model.layers.{i}.", f"decoder.layers.{i}."
        heads = {p: t[src + f"self_attn.{p}_proj.weight"].reshape(-1, dh, d) for p in "qkv"}
        full[dst + "self_attention.linear_qkv.weight"] = group_join(heads, "qkv", cfg)
        full[dst + "mlp.linear_fc1.weight"] = torch.stack([t[src + "mlp.gate_proj.weight"], t[src + "mlp.up_proj.weight"]])
        full.update({dst + ours: t[src + theirs] for ours, theirs in LLAMA_LAYER_NAMES})
    return full


def _gpt2_full(t: dict[str, Tensor], cfg: ModelConfig) -> dict[str, Tensor]:
    """Our full MHA state dict from GPT-2's tensors (the inverse of `hf.hf_state_dict`)."""
    from mlra_mega.model.hf import LAYER_NAMES

    d, h, dh, rows = cfg.hidden_size, cfg.num_heads, cfg.head_dim, cfg.padded_vocab_size
    scale = math.sqrt(d) if cfg.embedding == "scaled" else 1.0
    full = {
        "embedding.word_embeddings.weight": _pad_rows(t["transformer.wte.weight"] / scale, rows),
        "embedding.position_embeddings.weight": t["transformer.wpe.weight"][:cfg.max_positions] / scale,
        "decoder.final_layernorm.weight": t["transformer.ln_f.weight"],
        "decoder.final_layernorm.bias": t["transformer.ln_f.bias"],
    }
    if not cfg.tied_embeddings:
        full["output_layer.weight"] = _pad_rows(t["lm_head.weight"], rows)
    for i in range(cfg.num_layers):
        src, dst = f"transformer.h.{i}.", f"decoder.layers.{i}."
        # GPT-2's Conv1D [in, out] with all q, all k, all v -> megatron's rows head by head (q_h, k_h, v_h).
        qkv_w = t[src + "attn.c_attn.weight"].t().reshape(3, h, dh, d).transpose(0, 1).reshape(3 * d, d)
        qkv_b = t[src + "attn.c_attn.bias"].reshape(3, h, dh).transpose(0, 1).reshape(3 * d)
        full.update({dst + "self_attention.linear_qkv.weight": qkv_w, dst + "self_attention.linear_qkv.bias": qkv_b})
        full.update({dst + ours: (t[src + theirs].t() if transposed else t[src + theirs])
                     for ours, theirs, transposed in LAYER_NAMES})
    return full


def load_hf_weights(model: torch.nn.Module, path: str | Path, cfg: ModelConfig, tp_size: int, tp_rank: int,
                    log=print) -> None:
    """Copies the directory's weights into this rank's part of `model` (any TP, any PP stage)."""
    from mlra_mega.model.convert import load_shard, partition_dims, shard_state_dict
    from mlra_mega.model.pipeline import global_name, is_tied_copy, layer_offset

    full, errors = init_from_hf(path, cfg)
    offset = layer_offset(model)
    local = {}
    for name, _ in model.named_parameters():
        key = global_name(name, offset, is_tied_copy(model, name))
        if key not in full:  # what GPT-2 / Llama has no counterpart of (Embed LN's norm) keeps its fresh init
            continue
        local[name] = full[key]
    kept = sorted(set(dict(model.named_parameters())) - set(local))
    dims = {k: v for k, v in partition_dims(model).items() if k in local}
    shard = shard_state_dict(local, dims, tp_size, tp_rank)
    fresh = dict(model.named_parameters())
    load_shard(model, {**{k: fresh[k].detach() for k in kept}, **shard})
    log(f"[init] weights from {path} (Hugging Face {'Llama' if cfg.arch == 'llama' else 'GPT-2'})" + (f"; kept fresh: {', '.join(kept)}" if kept else ""))
    if errors:
        worst = max(errors)
        log(f"[init] MLRA rank {cfg.mlra_rank} from each head's truncated SVD: relative reconstruction error per "
            f"layer {', '.join(f'{e:.3g}' for e in errors)} (max {worst:.3g})")
