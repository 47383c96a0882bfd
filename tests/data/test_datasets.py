"""Training datasets: samples equal the encoded text, the order is fixed by the data alone,
DP-size independent, resumable at any consumed-samples count; bad set-ups refused."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from mlra_mega.config import ConfigError, DataConfig, ParallelConfig
from mlra_mega.data.datasets import SampleOrder, TrainBatches, build_datasets
from mlra_mega.data.preprocess import Progress, preprocess
from mlra_mega.data.tokenizer import load_tokenizer, train_tokenizer
from mlra_mega.errors import DataError
from tests.dist import dist_case, dist_result

SEQ = 32


def distributed_teardown() -> None:
    from mlra_mega import distributed

    distributed.teardown()


def distributed_setup() -> None:
    from mlra_mega import distributed

    distributed.setup(ParallelConfig(tensor=1), seed=1)


@pytest.fixture
def dist1() -> Iterator[None]:
    from mlra_mega import distributed

    distributed.setup(ParallelConfig(tensor=1), seed=1)  # megatron's builders want a process group
    yield
    distributed.teardown()


@pytest.fixture(scope="module")
def prefixes(tmp_path_factory: pytest.TempPathFactory, corpus_jsonl: Path, tokenizer_dir: Path) -> list[str]:
    root = tmp_path_factory.mktemp("ds")
    quiet = Progress(None, interactive=False, interval_s=1e9, log=lambda s: None)
    preprocess([corpus_jsonl], tokenizer_dir, root / "a", progress=quiet)
    half = root / "half.jsonl"
    half.write_text("".join(corpus_jsonl.read_text().splitlines(keepends=True)[:700]))
    preprocess([half], tokenizer_dir, root / "b", progress=quiet)
    return [str(root / "a"), str(root / "b")]


def data_cfg(prefixes: list[str], tmp: Path, **kw) -> DataConfig:
    return DataConfig(paths=prefixes[:1], cache_dir=str(tmp / "cache"), **kw)


def test_samples_are_windows_of_the_encoded_documents(dist1: None, tmp_path: Path, prefixes: list[str],
                                                      tokenizer_dir: Path, corpus_docs: list[str]) -> None:
    tok = load_tokenizer(tokenizer_dir)
    ds = build_datasets(data_cfg(prefixes, tmp_path, split="100,0,0"), SEQ, tok, seed=3).train
    encoded = [ids + [tok.eod] for ids in tok.sp.encode(corpus_docs)]
    stream = np.concatenate([np.asarray(encoded[d]) for d in ds.document_index])
    starts = np.concatenate([[0], np.cumsum([len(encoded[d]) for d in ds.document_index])])
    for i in (0, 1, 7, len(ds) - 1):
        j = ds.shuffle_index[i]
        doc_pos, offset = ds.sample_index[j]
        begin = starts[doc_pos] + offset
        window = stream[begin:begin + SEQ + 1]
        sample = ds[i]
        assert torch.equal(sample["tokens"], torch.as_tensor(window[:-1]))
        assert torch.equal(sample["labels"], torch.as_tensor(window[1:]))


def test_split_and_blend(dist1: None, tmp_path: Path, prefixes: list[str], tokenizer_dir: Path) -> None:
    tok = load_tokenizer(tokenizer_dir)
    single = build_datasets(data_cfg(prefixes, tmp_path, split="80,10,10"), SEQ, tok, seed=3)
    assert single.valid is not None and single.test is not None
    assert 6 < len(single.train) / len(single.valid) < 10
    blend = build_datasets(DataConfig(paths=prefixes, weights=[0.8, 0.2], cache_dir=str(tmp_path / "c")),
                           SEQ, tok, seed=3)
    sources = np.bincount(blend.train.dataset_index[:2000], minlength=2) / 2000
    assert abs(sources[0] - 0.8) < 0.02


def _batches(ds, dp_rank: int, dp_size: int, consumed: int = 0, steps: int = 3, seed: int = 3):
    b = TrainBatches(ds, SampleOrder(len(ds), seed), global_batch_size=8, micro_batch_size=2,
                     dp_rank=dp_rank, dp_size=dp_size, consumed_samples=consumed)
    return [torch.cat([m["tokens"] for m in b.next_global_batch()]) for _ in range(steps)], b


def test_resume_at_k_serves_the_uninterrupted_batches(dist1: None, tmp_path: Path, prefixes: list[str],
                                                      tokenizer_dir: Path) -> None:
    ds = build_datasets(data_cfg(prefixes, tmp_path), SEQ, load_tokenizer(tokenizer_dir), seed=3).train
    straight, _ = _batches(ds, 0, 1, steps=6)
    first, it = _batches(ds, 0, 1, steps=3)
    resumed, _ = _batches(ds, 0, 1, consumed=it.state_dict()["consumed_samples"], steps=3)
    assert all(torch.equal(a, b) for a, b in zip(straight, first + resumed))
    # The data is rebuilt from its cache in a fresh build: same order.
    again = build_datasets(data_cfg(prefixes, tmp_path), SEQ, load_tokenizer(tokenizer_dir), seed=3).train
    assert all(torch.equal(a, b) for a, b in zip(straight, _batches(again, 0, 1, steps=6)[0]))


def test_passes_beyond_the_data_keep_the_first_pass(dist1: None, tmp_path: Path, prefixes: list[str],
                                                    tokenizer_dir: Path) -> None:
    ds = build_datasets(data_cfg(prefixes, tmp_path), SEQ, load_tokenizer(tokenizer_dir), seed=3).train
    n = len(ds)
    order = SampleOrder(n, seed=3)
    assert [order[k] for k in range(n)] == list(range(n))  # pass 0 is megatron's own order
    second = [order[k] for k in range(n, 2 * n)]
    assert sorted(second) == list(range(n)) and second != list(range(n))
    assert second == [SampleOrder(n, seed=3)[k] for k in range(n, 2 * n)]  # seeded, not stateful
    # A run asking for many passes serves the same first batches as a short one.
    short, _ = _batches(ds, 0, 1, steps=2)
    long_run = TrainBatches(ds, SampleOrder(n, 3), global_batch_size=8, micro_batch_size=2, dp_rank=0, dp_size=1)
    for _ in range(3 * n // 8 + 1):
        long_run.next_global_batch()
    assert all(torch.equal(a, b) for a, b in zip(short, _batches(ds, 0, 1, steps=2)[0]))


def test_another_tokenizers_dataset_is_refused_with_both(dist1: None, tmp_path: Path, prefixes: list[str],
                                                         corpus_jsonl: Path) -> None:
    other = tmp_path / "other-tok"
    train_tokenizer([corpus_jsonl], 400, other, log=lambda s: None)
    with pytest.raises(DataError, match=r"was made by tokenizer .*vocab 600.*, not by .*other-tok.*vocab 400"):
        build_datasets(data_cfg(prefixes, tmp_path), SEQ, load_tokenizer(other), seed=3)


def test_a_cardless_megatron_prefix_is_used_as_it_is(dist1: None, tmp_path: Path, prefixes: list[str],
                                                     tokenizer_dir: Path, corpus_jsonl: Path) -> None:
    """A prefix with .bin / .idx only (as Megatron-LM's preprocess_data.py writes `..._text_document`):
    the same samples as with its card; a cut .bin and ids outside data.tokenizer's vocabulary are refused."""
    tok = load_tokenizer(tokenizer_dir)
    cardless = tmp_path / "corpus_text_document"
    for ext in (".bin", ".idx"):
        shutil.copy(prefixes[0] + ext, str(cardless) + ext)
    carded = build_datasets(data_cfg(prefixes, tmp_path), SEQ, tok, seed=3).train
    plain = build_datasets(DataConfig(paths=[str(cardless)], cache_dir=str(tmp_path / "cache2")), SEQ, tok, seed=3).train
    assert len(plain) == len(carded) and all(torch.equal(plain[i]["tokens"], carded[i]["tokens"]) for i in range(20))
    from mlra_mega.config import load_config
    from mlra_mega.train.run import train
    from tests.train.test_checkpoint import overrides

    distributed_teardown()  # train() sets up its own process group
    history, _ = train(load_config(None, overrides(tokenizer_dir, str(cardless), tmp_path / "run", "train.steps=2",
                                                   "tracking.enabled=false")), log=lambda s: None)
    assert [m.step for m in history] == [1, 2]
    distributed_setup()
    small = tmp_path / "small-tok"
    train_tokenizer([corpus_jsonl], 400, small, log=lambda s: None)
    with pytest.raises(DataError, match=r"holds token id 5\d\d, outside data.tokenizer's vocabulary of 400"):
        build_datasets(DataConfig(paths=[str(cardless)]), SEQ, load_tokenizer(small), seed=3)
    data = Path(f"{cardless}.bin").read_bytes()
    Path(f"{cardless}.bin").write_bytes(data[:-10])
    with pytest.raises(DataError, match=r"corpus_text_document.bin has \d+ bytes, its .idx describes"):
        build_datasets(DataConfig(paths=[str(cardless)]), SEQ, tok, seed=3)


def test_bad_setups_are_clear_errors(dist1: None, tmp_path: Path, prefixes: list[str], tokenizer_dir: Path) -> None:
    tok = load_tokenizer(tokenizer_dir)
    with pytest.raises(DataError, match="cannot serve sequences of 500000 tokens"):
        build_datasets(data_cfg(prefixes, tmp_path), 500_000, tok, seed=3)
    with pytest.raises(DataError, match="no dataset at"):
        build_datasets(DataConfig(paths=[str(tmp_path / "nope")]), SEQ, tok, seed=3)
    with pytest.raises(ConfigError, match="data.paths: is empty"):
        build_datasets(DataConfig(), SEQ, tok, seed=3)
    with pytest.raises(ConfigError, match="data.split"):
        build_datasets(data_cfg(prefixes, tmp_path, split="98,2"), SEQ, tok, seed=3)
    with pytest.raises(ConfigError, match="data.weights: 1 weights for 2 paths"):
        build_datasets(DataConfig(paths=prefixes, weights=[1.0]), SEQ, tok, seed=3)
    ds = build_datasets(data_cfg(prefixes, tmp_path), SEQ, tok, seed=3).train
    with pytest.raises(ConfigError, match="not a multiple of micro_batch_size x data-parallel size"):
        TrainBatches(ds, SampleOrder(len(ds), 3), global_batch_size=6, micro_batch_size=2, dp_rank=0, dp_size=2)


@dist_case(1, 2)
def global_batches(root: str) -> dict[str, list[list[int]]]:
    """This rank's tokens of 3 global batches, at DP = world and at TP = world (DP = 1)."""
    from mlra_mega import distributed

    root = Path(root)  # the parent's prefixes and tokenizer
    out = {}
    for tp in sorted({1, torch.distributed.get_world_size()}):
        ctx = distributed.setup(ParallelConfig(tensor=tp), seed=1)
        try:
            ds = build_datasets(DataConfig(paths=[str(root / "a")], cache_dir=str(root / f"cache-{tp}")), SEQ,
                                load_tokenizer(root / "tok"), seed=3).train
            batches, _ = _batches(ds, ctx.dp_rank, ctx.dp_size)
            out[f"tp{tp}"] = [b.tolist() for b in batches]
        finally:
            distributed.teardown(keep_process_group=True)
    return out


@pytest.mark.slow
def test_global_batches_do_not_depend_on_the_data_parallel_size(prefixes: list[str], tokenizer_dir: Path) -> None:
    root = Path(prefixes[0]).parent
    shutil.copytree(tokenizer_dir, root / "tok", dirs_exist_ok=True)
    (one,) = dist_result(__name__, 1, "global_batches", root=str(root))
    r0, r1 = dist_result(__name__, 2, "global_batches", root=str(root))
    for step in range(3):
        assert r0["tp1"][step] + r1["tp1"][step] == one["tp1"][step]  # DP=2: the halves of the DP=1 batch
        assert r0["tp2"][step] == r1["tp2"][step] == one["tp1"][step]  # TP=2, DP=1: both ranks see it all
