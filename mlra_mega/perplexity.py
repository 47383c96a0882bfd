"""Perplexity of a token stream with rolling windows, the definition `mlra-mega evaluate --text` uses.

Windows of `window` input tokens start every `stride` tokens; each target token is scored once,
by the first window that reaches it, so a smaller stride gives later tokens more context. At
stride = window the windows are the validation split's samples (window inputs, the next token of
each as its label, the last label the next sample's first token), so the perplexity equals the
validation perplexity on the same tokens. A text file is read as the pre-processing reads it
(a document per line, or per JSON Lines record) and each document ends with the end-of-document
id, so its tokens are those `mlra-mega preprocess` would write for it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from mlra_mega.errors import ConfigError

__all__ = ["Perplexity", "rolling_perplexity", "text_token_ids", "token_logprobs"]


def token_logprobs(lm, ids: list[int]) -> Tensor:
    """log p(ids[i+1] | ids[:i+1]) for each i, in float64 (len(ids) - 1 values) from one forward."""
    logits = lm.logits(ids[:-1]).double()
    targets = torch.tensor(ids[1:], dtype=torch.long).unsqueeze(1)
    return torch.log_softmax(logits, dim=-1).gather(1, targets).squeeze(1)


@dataclass(frozen=True)
class Perplexity:
    nll: float  # summed negative log-likelihood (nats)
    tokens: int  # tokens scored (every token but the first)
    windows: int

    @property
    def value(self) -> float:
        return math.exp(min(self.nll / self.tokens, 700.0))


@torch.no_grad()
def rolling_perplexity(lm, ids: list[int], window: int, stride: int | None = None,
                       progress: Callable[[int, int], None] | None = None) -> Perplexity:
    """Every token of `ids` after the first, scored once with windows of `window` inputs every
    `stride` tokens (default: `window`, disjoint windows)."""
    stride = window if stride is None else stride
    if not 1 <= stride <= window:
        raise ConfigError("--stride", f"must be in [1, {window}] (the window), got {stride}",
                          f"give at most {window}, or leave it out for disjoint windows")
    if len(ids) < 2:
        raise ConfigError("--text", f"{len(ids)} token(s): nothing to predict", "give a longer text")
    last = len(ids) - 1  # the last target's index
    nll, scored, windows, begin = 0.0, 0, 0, 0
    while scored < last:
        end = min(begin + window, last)  # inputs ids[begin:end], targets ids[begin + 1:end + 1]
        logp = token_logprobs(lm, ids[begin:end + 1])
        new = end - scored  # targets 1..scored were taken by earlier windows
        nll -= float(logp[-new:].sum())
        scored, windows, begin = end, windows + 1, begin + stride
        if progress is not None:
            progress(scored, last)
    return Perplexity(nll, last, windows)


def text_token_ids(path: str | Path, encode: Callable[[list[str]], list[list[int]]], eod: int) -> list[int]:
    """The file's documents (one per line, or per JSON Lines record), each followed by `eod`."""
    from mlra_mega.data.documents import ReadOptions, ReadStats, iter_documents

    path = Path(path)
    if not path.is_file():
        raise ConfigError("--text", f"{path} is not a file", "give a text or JSON Lines file")
    docs = list(iter_documents(path, ReadOptions(), ReadStats()))
    if not docs:
        raise ConfigError("--text", f"{path} holds no document", "give a file with some text")
    ids: list[int] = []
    for doc in encode(docs):
        ids += [*doc, eod]
    return ids
