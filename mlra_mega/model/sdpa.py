"""Core attention through torch's scaled_dot_product_attention, in megatron's interface.

Takes query / key / value as [s, b, heads, d_head] (this rank's heads) and returns
[s, b, heads * d_head], like megatron's DotProductAttention, with the causal mask built in
(aligned to the last key when a KV cache holds more keys than there are queries; none for a
decoding step, which megatron marks `no_mask`). Fewer key/value heads than query heads
(grouped-query attention) are shared by consecutive query heads, as megatron's layout groups them.
Attention dropout draws from the tensor-parallel RNG stream, as megatron's does, since the
heads differ across TP ranks.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from megatron.core import tensor_parallel
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule

__all__ = ["SDPAttention"]


class SDPAttention(MegatronModule):
    def __init__(self, config, layer_number: int, attn_mask_type: AttnMaskType, attention_type: str = "self",
                 cp_comm_type: str | None = None, softmax_scale: float | None = None, pg_collection=None,
                 **_: object) -> None:
        super().__init__(config=config)
        if attn_mask_type != AttnMaskType.causal:
            raise ValueError(f"SDPAttention supports causal masks only, got {attn_mask_type}")
        self.dropout_p = config.attention_dropout
        self.scale = softmax_scale or 1.0 / math.sqrt(config.kv_channels)

    def forward(self, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None, *,
                attn_mask_type: AttnMaskType | None = None, attention_bias: Tensor | None = None,
                packed_seq_params: object | None = None) -> Tensor:
        if attention_bias is not None or packed_seq_params is not None:
            raise ValueError("SDPAttention supports neither attention bias nor packed sequences")
        s, b, h, d = query.shape
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, h, s, d]
        p = self.dropout_p if self.training else 0.0
        gqa = {"enable_gqa": True} if key.shape[2] != h else {}  # fewer key/value heads (llama's GQA)
        causal, mask = True, None
        if attn_mask_type == AttnMaskType.no_mask:  # decoding with a KV cache: the new token sees all
            causal = False
        elif key.shape[0] != s:
            # More keys than queries (a cached prefix): is_causal would align the mask top-left.
            causal = False
            offset = key.shape[0] - s
            mask = torch.ones(s, key.shape[0], dtype=torch.bool, device=q.device).tril(diagonal=offset)
        if p > 0:
            with tensor_parallel.get_cuda_rng_tracker().fork():
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p, is_causal=causal,
                                                     scale=self.scale, **gqa)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=self.scale, **gqa)
        return out.permute(2, 0, 1, 3).reshape(s, b, h * d)
