"""Training data on megatron-core datasets, in a deterministic order that survives any restart.

`build_datasets` makes train / valid / test GPTDatasets (a BlendedDataset for several prefixes)
with megatron-core's BlendedMegatronDatasetBuilder, each for a size fixed by the data alone: one
epoch of each split (by tokens, for a weighted blend), never by `train.steps`. megatron's shuffle
depends on the size it is asked for, so fixing it is what keeps an extended run from reordering.

`SampleOrder` maps the global sample index k to a dataset index: pass p = k // N over the N
samples, pass 0 in megatron's own shuffled order, every later pass a permutation seeded by
(seed, p). The first N samples therefore never depend on how long the run is.

`TrainBatches` serves this DP rank's micro-batches of each global batch, keyed by the number of
samples consumed: global batch b is samples [b*G, (b+1)*G), DP rank r takes the contiguous block
[r*G/DP, (r+1)*G/DP) of it. The union over ranks is the same whatever DP is, and a run resumed at
consumed samples k serves exactly the batches an uninterrupted run would.
"""

from __future__ import annotations

import json
import os
from struct import error as struct_error
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mlra_mega.config import DataConfig
from mlra_mega.data.preprocess import dataset_card_path
from mlra_mega.data.tokenizer import Tokenizer
from mlra_mega.errors import ConfigError, DataError

__all__ = ["Datasets", "SampleOrder", "TrainBatches", "build_datasets",
           "check_dataset_cards", "default_cache_dir", "collate"]


def default_cache_dir() -> Path:
    return Path(os.environ.get("MLRA_MEGA_CACHE", Path.home() / ".cache" / "mlra_mega")) / "index"


def check_dataset_cards(prefixes: list[str], tokenizer: Tokenizer) -> None:
    """Each dataset exists and was made by this tokenizer (by its card), else a DataError. A prefix
    without a card (made by Megatron-LM's preprocessing) gets the file checks and a token-id check."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    for prefix in prefixes:
        if not IndexedDataset.exists(prefix):
            raise DataError(f"data.paths: no dataset at {prefix} ({prefix}.bin / {prefix}.idx) "
                            "(fix: run `mlra-mega preprocess` with --output-prefix " + prefix + ")")
        card_path = dataset_card_path(prefix)
        if not card_path.is_file():
            # A prefix made elsewhere (Megatron-LM's preprocess_data.py): its tokens are taken as made by
            # data.tokenizer, which the run names explicitly; its files are still checked.
            check_dataset_files(prefix, {})
            check_token_ids(prefix, tokenizer.vocab_size)
            continue
        card = _read_card(card_path)
        made_by = card["tokenizer"]
        check_dataset_files(prefix, card)
        if made_by["model_sha256"] != tokenizer.card.model_sha256:
            raise DataError(f"data.paths: {prefix} was made by tokenizer {made_by['path']} "
                            f"(sha256 {made_by['model_sha256'][:12]}, vocab {made_by['vocab_size']}), not by "
                            f"{tokenizer.model_path} (sha256 {tokenizer.card.model_sha256[:12]}, vocab "
                            f"{tokenizer.vocab_size}) (fix: preprocess it again with data.tokenizer, or set "
                            "data.tokenizer to the one that made it)")


def _read_card(path: Path) -> dict[str, Any]:
    """The dataset card, with the fields the checks read, or a DataError naming what is missing."""
    fix = "(fix: re-run `mlra-mega preprocess` for it)"
    try:
        card = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise DataError(f"data.paths: the card {path} cannot be read ({exc}) {fix}") from None
    tok = card.get("tokenizer") if isinstance(card, dict) else None
    if not isinstance(tok, dict) or not all(k in tok for k in ("model_sha256", "path", "vocab_size")):
        raise DataError(f"data.paths: the card {path} does not name its tokenizer (no tokenizer.model_sha256, "
                        f"path and vocab_size) {fix}")
    return card


def check_dataset_files(prefix: str, card: dict[str, Any]) -> None:
    """`.bin`, `.idx` and card agree (dtype, document and token counts, bytes), else a DataError:
    a `.bin` cut short or an `.idx` of another dataset is found here, not at some step."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    fix = "(fix: preprocess it again; the .bin, .idx and .json of a prefix belong together)"
    try:
        indexed = IndexedDataset(prefix)
    except (AssertionError, ValueError, OSError, struct_error) as exc:
        raise DataError(f"data.paths: {prefix}.idx cannot be read ({str(exc)[:200]}) {fix}") from None
    try:
        lengths = indexed.sequence_lengths
        tokens, sequences = int(lengths.sum()), len(lengths)
        itemsize = np.dtype(indexed.index.dtype).itemsize
        dtype = np.dtype(indexed.index.dtype).name
    finally:
        del indexed
    summary = card.get("summary") or {}
    expected = {"dtype": card.get("dtype"), "documents": summary.get("documents"), "tokens": summary.get("tokens")}
    found = {"dtype": dtype, "documents": sequences, "tokens": tokens}
    differ = [f"{k}: card {expected[k]}, index {found[k]}" for k in found
              if expected[k] is not None and expected[k] != found[k]]
    if differ:
        raise DataError(f"data.paths: {prefix}.idx does not match its card {prefix}.json ({'; '.join(differ)}) {fix}")
    bin_bytes = Path(f"{prefix}.bin").stat().st_size
    if bin_bytes != tokens * itemsize:
        raise DataError(f"data.paths: {prefix}.bin has {bin_bytes} bytes, its .idx describes {tokens} tokens of "
                        f"{dtype} = {tokens * itemsize} bytes {fix}")


def check_token_ids(prefix: str, vocab_size: int, limit: int = 1 << 26) -> None:
    """Every token id of a card-less dataset (its first `limit` tokens) is inside the vocabulary:
    ids from another tokenizer are a DataError here, not an index error inside the embedding."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    indexed = IndexedDataset(prefix)
    try:
        dtype = np.dtype(indexed.index.dtype)
    finally:
        del indexed
    size = Path(f"{prefix}.bin").stat().st_size // dtype.itemsize
    tokens = np.memmap(f"{prefix}.bin", dtype=dtype, mode="r", shape=(size,))
    highest = int(tokens[:limit].max()) if size else -1
    if highest >= vocab_size:
        raise DataError(f"data.paths: {prefix} holds token id {highest}, outside data.tokenizer's vocabulary of "
                        f"{vocab_size} (it has no card, so its tokenizer is taken to be data.tokenizer) (fix: set "
                        "data.tokenizer to the tokenizer that made it)")


@dataclass
class Datasets:
    train: Any
    valid: Any | None
    test: Any | None


def _split_fractions(split: str) -> list[float]:
    try:
        parts = [float(x) for x in split.replace("/", ",").split(",")]
    except ValueError:
        parts = []
    if len(parts) != 3 or any(p < 0 for p in parts) or sum(parts) <= 0:
        raise ConfigError("data.split", f"{split!r} is not three non-negative weights",
                          "write train,valid,test weights such as 98,1,1")
    total = sum(parts)
    return [p / total for p in parts]


def _epoch_sizes(prefixes: list[str], split: list[float], seq_length: int) -> list[int | None]:
    """Samples in one epoch of each split of a weighted blend, from the token counts."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    tokens = 0
    for prefix in prefixes:
        # Kept in a name while read: its lengths are a view of an mmap the object closes on deletion.
        indexed = IndexedDataset(prefix)
        tokens += int(indexed.sequence_lengths.sum())
        del indexed
    return [max(1, int(tokens * f) // seq_length) if f > 0 else None for f in split]


def build_datasets(data: DataConfig, seq_length: int, tokenizer: Tokenizer, seed: int) -> Datasets:
    """Train / valid / test datasets of the blend in `data`; every rank calls this."""
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    if not data.paths:
        raise ConfigError("data.paths", "is empty", "list the dataset prefixes made by `mlra-mega preprocess`")
    if data.weights is not None and len(data.weights) != len(data.paths):
        raise ConfigError("data.weights", f"{len(data.weights)} weights for {len(data.paths)} paths",
                          "give one weight per path, or null for proportional to size")
    check_dataset_cards(list(data.paths), tokenizer)
    split = _split_fractions(data.split)
    if split[0] == 0:
        raise ConfigError("data.split", f"{data.split!r} gives the train split nothing", "give it a positive weight")
    sizes: list[int | None] = [None, None, None]
    if data.weights is not None and len(data.paths) > 1:
        sizes = _epoch_sizes(list(data.paths), split, seq_length)
    cache = Path(data.cache_dir) if data.cache_dir else default_cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    config = GPTDatasetConfig(
        random_seed=seed, sequence_length=seq_length,
        blend=(list(data.paths), list(data.weights) if data.weights is not None else None),
        split=",".join(str(f) for f in split), path_to_cache=str(cache), tokenizer=tokenizer.megatron(),
        reset_position_ids=False, reset_attention_mask=False, eod_mask_loss=False, create_attention_mask=False,
    )
    train, valid, test = BlendedMegatronDatasetBuilder(GPTDataset, sizes, lambda: True, config).build()
    if train is None or len(train) == 0:
        raise DataError(f"the train split cannot serve sequences of {seq_length} tokens: it holds fewer than "
                        f"{seq_length + 1} tokens (fix: lower model.seq_length, or add data / raise the train "
                        "share of data.split)")
    return Datasets(train, valid if valid is not None and len(valid) else None,
                    test if test is not None and len(test) else None)


class SampleOrder:
    """Global sample index -> dataset index, over as many passes as the run needs."""

    def __init__(self, size: int, seed: int) -> None:
        if size < 1:
            raise ValueError("empty dataset")
        self.size, self.seed = size, seed
        self._perms: dict[int, np.ndarray] = {}

    def _perm(self, p: int) -> np.ndarray:
        if p not in self._perms:
            rng = np.random.Generator(np.random.PCG64([self.seed, p]))
            self._perms = {p: rng.permutation(self.size)}  # one pass kept at a time: bounded memory
        return self._perms[p]

    def __getitem__(self, k: int) -> int:
        p, j = divmod(int(k), self.size)
        return j if p == 0 else int(self._perm(p)[j])


def collate(samples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    keys = ("tokens", "labels", "loss_mask", "position_ids")
    return {k: torch.stack([torch.as_tensor(s[k]) for s in samples]) for k in keys}


class TrainBatches:
    """This DP rank's micro-batches, global batch after global batch, from `consumed_samples` on."""

    def __init__(self, dataset: Any, order: SampleOrder, *, global_batch_size: int, micro_batch_size: int,
                 dp_rank: int, dp_size: int, consumed_samples: int = 0) -> None:
        if global_batch_size % (micro_batch_size * dp_size):
            raise ConfigError("train.global_batch_size",
                              f"{global_batch_size} is not a multiple of micro_batch_size x data-parallel size "
                              f"= {micro_batch_size} x {dp_size}",
                              "make it micro_batch_size x data-parallel size x accumulation steps")
        self.dataset, self.order = dataset, order
        self.global_batch_size, self.micro_batch_size = global_batch_size, micro_batch_size
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.consumed_samples = consumed_samples

    @property
    def accumulation_steps(self) -> int:
        return self.global_batch_size // (self.micro_batch_size * self.dp_size)

    def rank_indices(self, consumed: int) -> list[int]:
        """Global sample indices of this rank's share of the global batch starting at `consumed`."""
        per_rank = self.global_batch_size // self.dp_size
        start = consumed + self.dp_rank * per_rank
        return list(range(start, start + per_rank))

    def batch_at(self, consumed: int) -> list[dict[str, torch.Tensor]]:
        """This rank's micro-batches of the global batch starting at `consumed` samples."""
        samples = [self.dataset[self.order[k]] for k in self.rank_indices(consumed)]
        m = self.micro_batch_size
        return [collate(samples[i:i + m]) for i in range(0, len(samples), m)]

    def next_global_batch(self) -> list[dict[str, torch.Tensor]]:
        """This rank's micro-batches of the next global batch; advances consumed_samples."""
        micro = self.batch_at(self.consumed_samples)
        self.consumed_samples += self.global_batch_size
        return micro

    def __iter__(self) -> Iterator[list[dict[str, torch.Tensor]]]:
        while True:
            yield self.next_global_batch()

    def state_dict(self) -> dict[str, int]:
        return {"consumed_samples": self.consumed_samples}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.consumed_samples = int(state["consumed_samples"])

