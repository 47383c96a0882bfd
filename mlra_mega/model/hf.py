"""Export to Hugging Face GPT-2 (`GPT2LMHeadModel`, gpt2 blocks) or Llama (`LlamaForCausalLM`,
llama blocks), computing our function.

- MLRA exports exactly: each head's factors are composed (W_h = A_h B_h, `convert.mlra_to_mha`),
  so a model trained with MLRA deploys as plain GPT-2 or Llama (grouped-query heads included).
- Scaled Embed exports when embeddings are untied: sqrt(d) is folded into the token (and, for
  GPT-2, position) embeddings (the scale multiplies their sum). Tied, the same matrix is also the
  output head, so the fold would change the logits: refused.
- Embed LN has no GPT-2 or Llama counterpart: refused.
- Padded vocabulary rows are kept (`to_hf`). TP > 1 models are gathered over their TP group first.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import Tensor

from mlra_mega.config import ModelConfig
from mlra_mega.errors import ConfigError
from mlra_mega.model.convert import full_state_dict, mlra_to_mha

__all__ = ["check_exportable", "hf_config", "hf_state_dict", "to_hf", "hf_tokenizer", "hf_model_name",
           "LAYER_NAMES", "LLAMA_LAYER_NAMES"]


def hf_model_name(cfg: ModelConfig) -> str:
    return "Llama" if cfg.arch == "llama" else "GPT-2"


def check_exportable(cfg: ModelConfig) -> None:
    name = hf_model_name(cfg)
    if cfg.embedding == "layernorm":
        raise ConfigError("model.embedding", f"Embed LN (a LayerNorm on the embedding output) has no {name} "
                          f"counterpart, so it cannot be exported to Hugging Face {name}",
                          "export vanilla, scaled (untied) or MLRA models")
    if cfg.embedding == "scaled" and cfg.tied_embeddings:
        raise ConfigError("model.embedding", f"Scaled Embed with tied embeddings cannot be exported to {name}: "
                          "folding sqrt(d) into the shared matrix would also scale the logits",
                          "train Scaled Embed with model.tie_embeddings=false to export it")


def hf_config(cfg: ModelConfig):
    if cfg.arch == "llama":
        from transformers import LlamaConfig

        return LlamaConfig(
            vocab_size=cfg.padded_vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.ffn_size,
            num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.kv_heads,
            head_dim=cfg.head_dim, hidden_act="silu", max_position_embeddings=cfg.max_positions,
            initializer_range=cfg.init_std, rms_norm_eps=cfg.layernorm_eps, rope_theta=float(cfg.rotary_base),
            attention_bias=False, mlp_bias=False, attention_dropout=cfg.attention_dropout,
            tie_word_embeddings=cfg.tied_embeddings, bos_token_id=None, eos_token_id=None, pad_token_id=None,
        )
    from transformers import GPT2Config

    return GPT2Config(
        vocab_size=cfg.padded_vocab_size, n_positions=cfg.max_positions, n_embd=cfg.hidden_size,
        n_layer=cfg.num_layers, n_head=cfg.num_heads, n_inner=cfg.ffn_size, activation_function="gelu_new",
        resid_pdrop=cfg.hidden_dropout, embd_pdrop=cfg.hidden_dropout, attn_pdrop=cfg.attention_dropout,
        layer_norm_epsilon=cfg.layernorm_eps, initializer_range=cfg.init_std, scale_attn_weights=True,
        tie_word_embeddings=cfg.tied_embeddings, bos_token_id=None, eos_token_id=None,
    )


# Per layer, every tensor but the fused QKV: (ours, GPT-2's, whether GPT-2's Conv1D holds it transposed).
LAYER_NAMES = [
    ("input_layernorm.weight", "ln_1.weight", False), ("input_layernorm.bias", "ln_1.bias", False),
    ("self_attention.linear_proj.weight", "attn.c_proj.weight", True),
    ("self_attention.linear_proj.bias", "attn.c_proj.bias", False),
    ("pre_mlp_layernorm.weight", "ln_2.weight", False), ("pre_mlp_layernorm.bias", "ln_2.bias", False),
    ("mlp.linear_fc1.weight", "mlp.c_fc.weight", True), ("mlp.linear_fc1.bias", "mlp.c_fc.bias", False),
    ("mlp.linear_fc2.weight", "mlp.c_proj.weight", True), ("mlp.linear_fc2.bias", "mlp.c_proj.bias", False),
]


# Per llama layer, every tensor but q/k/v and the [gate; up] pair: (ours, Llama's), both [out, in].
LLAMA_LAYER_NAMES = [
    ("input_layernorm.weight", "input_layernorm.weight"),
    ("self_attention.linear_proj.weight", "self_attn.o_proj.weight"),
    ("pre_mlp_layernorm.weight", "post_attention_layernorm.weight"),
    ("mlp.linear_fc2.weight", "mlp.down_proj.weight"),
]


def _llama_state_dict(full: dict[str, Tensor], cfg: ModelConfig) -> dict[str, Tensor]:
    from mlra_mega.model.convert import group_split

    scale = math.sqrt(cfg.hidden_size) if cfg.embedding == "scaled" else 1.0
    out = {"model.embed_tokens.weight": full["embedding.word_embeddings.weight"] * scale,
           "model.norm.weight": full["decoder.final_layernorm.weight"]}
    for i in range(cfg.num_layers):
        src, dst = f"decoder.layers.{i}.", f"model.layers.{i}."
        # megatron: rows group by group (the group's q heads, its k, its v); Llama: all q, all k, all v.
        qkv = group_split(full[src + "self_attention.linear_qkv.weight"], "qkv", cfg, cfg.head_dim)
        for p in "qkv":
            out[dst + f"self_attn.{p}_proj.weight"] = qkv[p].reshape(-1, cfg.hidden_size)
        gate, up = full[src + "mlp.linear_fc1.weight"]
        out.update({dst + "mlp.gate_proj.weight": gate, dst + "mlp.up_proj.weight": up})
        out.update({dst + theirs: full[src + ours] for ours, theirs in LLAMA_LAYER_NAMES})
    out["lm_head.weight"] = out["model.embed_tokens.weight"] if cfg.tied_embeddings else full["output_layer.weight"]
    return out


def hf_state_dict(full: dict[str, Tensor], cfg: ModelConfig) -> dict[str, Tensor]:
    """GPT2LMHeadModel or LlamaForCausalLM tensors from our full (gathered, padded) state dict."""
    check_exportable(cfg)
    if cfg.attention == "mlra":
        full = mlra_to_mha(full, cfg)
    if cfg.arch == "llama":
        return {k: v.detach().float().contiguous().clone() for k, v in _llama_state_dict(full, cfg).items()}
    d, h, dh = cfg.hidden_size, cfg.num_heads, cfg.head_dim
    scale = math.sqrt(d) if cfg.embedding == "scaled" else 1.0
    out = {
        "transformer.wte.weight": full["embedding.word_embeddings.weight"] * scale,
        "transformer.wpe.weight": full["embedding.position_embeddings.weight"] * scale,
        "transformer.ln_f.weight": full["decoder.final_layernorm.weight"],
        "transformer.ln_f.bias": full["decoder.final_layernorm.bias"],
    }
    for i in range(cfg.num_layers):
        src, dst = f"decoder.layers.{i}.", f"transformer.h.{i}."
        # megatron: rows head by head (q_h, k_h, v_h); GPT-2's Conv1D: [in, out] with all q, all k, all v.
        qkv_w = full[src + "self_attention.linear_qkv.weight"].view(h, 3, dh, d).transpose(0, 1).reshape(3 * d, d)
        qkv_b = full[src + "self_attention.linear_qkv.bias"].view(h, 3, dh).transpose(0, 1).reshape(3 * d)
        out.update({dst + "attn.c_attn.weight": qkv_w.t(), dst + "attn.c_attn.bias": qkv_b})
        out.update({dst + theirs: (full[src + ours].t() if transposed else full[src + ours])
                    for ours, theirs, transposed in LAYER_NAMES})
    out["lm_head.weight"] = (out["transformer.wte.weight"] if cfg.tied_embeddings
                             else full["output_layer.weight"])
    return {k: v.detach().float().contiguous().clone() for k, v in out.items()}


def to_hf(model: torch.nn.Module, cfg: ModelConfig):
    """A transformers GPT2LMHeadModel (gpt2) or LlamaForCausalLM (llama) computing `model`'s function.
    The padding rows of the vocabulary are kept: they take part in the softmax as in our model, so
    probabilities (and perplexities) are the same; generation never samples them (`generate` cuts
    the logits to the tokenizer)."""
    from transformers import GPT2LMHeadModel, LlamaForCausalLM

    check_exportable(cfg)
    tensors = hf_state_dict(full_state_dict(model), cfg)
    hf = (LlamaForCausalLM if cfg.arch == "llama" else GPT2LMHeadModel)(hf_config(cfg))
    missing, unexpected = hf.load_state_dict(tensors, strict=False)
    missing = [k for k in missing if not k.endswith(".attn.bias") and not k.endswith(".attn.masked_bias")
               and not (cfg.tied_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(f"{hf_model_name(cfg)} export mismatch: missing {missing}, unexpected {unexpected}")
    return hf.eval()


def hf_tokenizer(tokenizer_model: Path):
    """A transformers fast tokenizer that encodes exactly like the sentencepiece model.

    Built with transformers' own converter from the sentencepiece proto (normalizer, dummy
    prefix, whitespace handling and byte fallback follow the model's settings), so
    `AutoTokenizer.from_pretrained` on the saved directory gives our token ids.
    """
    from sentencepiece import sentencepiece_model_pb2
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import SpmConverter

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(Path(tokenizer_model).read_bytes())
    pieces = list(proto.pieces)
    bpe = proto.trainer_spec.model_type == sentencepiece_model_pb2.TrainerSpec.BPE
    vocab = {p.piece: i for i, p in enumerate(pieces)} if bpe else [(p.piece, p.score) for p in pieces]
    backend = SpmConverter.build_tokenizer_from_spm_proto(proto, vocab)
    if backend is None:
        raise ConfigError("tokenizer", f"{tokenizer_model}: sentencepiece model type "
                          f"{proto.trainer_spec.model_type} cannot be converted", "use a bpe or unigram tokenizer")
    unk = pieces[proto.trainer_spec.unk_id].piece
    eos = pieces[proto.trainer_spec.eos_id].piece if proto.trainer_spec.eos_id >= 0 else None
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token=unk, eos_token=eos)


def hf_fast_tokenizer(tokenizer):
    """A transformers fast tokenizer over a Hugging Face tokenizer.json of ours (`data.tokenizer.Tokenizer`)."""
    from transformers import PreTrainedTokenizerFast

    eos = tokenizer.hf.id_to_token(tokenizer.eod)
    return PreTrainedTokenizerFast(tokenizer_file=str(tokenizer.model_path), eos_token=eos)
