"""TEV against a float64 NumPy reference: unsharded, and sharded over TP 1/2/4 with padding."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mlra_mega.metrics.tev import compute_tev
from tests.dist import dist_case, dist_result

VOCAB = 130          # padded to 256 with vocab_multiple 128
PADDED = 256
HIDDEN = 64


def full_weight() -> torch.Tensor:
    """Real rows ~ N(0, 0.02) with per-row scale; padded rows hold large random values."""
    g = torch.Generator().manual_seed(7)
    w = torch.randn(PADDED, HIDDEN, generator=g) * 0.02
    w[:VOCAB] *= torch.rand(VOCAB, 1, generator=g) * 3 + 0.5
    w[VOCAB:] = torch.randn(PADDED - VOCAB, HIDDEN, generator=g) * 1e3 + 50
    return w


def reference(w: torch.Tensor, vocab: int) -> tuple[float, float]:
    rows = np.asarray(w[:vocab], dtype=np.float64)
    tev = rows.std(axis=1)  # population (1/d)
    return float(tev.mean()), float(tev.std())  # population (1/|V|)


def test_unsharded_matches_numpy() -> None:
    w = full_weight()
    stats = compute_tev(w, VOCAB)
    mean, std = reference(w, VOCAB)
    assert stats.count == VOCAB
    assert stats.mean == pytest.approx(mean, rel=1e-6)
    assert stats.std == pytest.approx(std, rel=1e-5)


def test_padded_rows_never_count() -> None:
    w = full_weight()
    changed = w.clone()
    changed[VOCAB:] = torch.randn(PADDED - VOCAB, HIDDEN) * 1e6
    assert compute_tev(changed, VOCAB) == compute_tev(w, VOCAB)


def test_bf16_weight_uses_float32_row_statistics() -> None:
    w = full_weight()
    stats = compute_tev(w.to(torch.bfloat16), VOCAB)
    mean, std = reference(w.to(torch.bfloat16).float(), VOCAB)
    assert stats.mean == pytest.approx(mean, rel=1e-6)
    assert stats.std == pytest.approx(std, rel=1e-5)


def test_row_statistics_across_chunks_and_far_from_zero_match_numpy() -> None:
    """Rows are taken in chunks of about 2**20 elements: 3001 x 768 spans three chunks, the last
    one short; rows with a mean 100x their deviation would lose digits to a one-pass formula."""
    from mlra_mega.metrics.tev import row_tev

    g = torch.Generator().manual_seed(3)
    w = torch.randn(3001, 768, generator=g) * 0.02
    w[::7] += 2.0
    got = row_tev(w).double().numpy()
    want = np.asarray(w, dtype=np.float64).std(axis=1)
    np.testing.assert_allclose(got, want, rtol=2e-6)


def test_no_real_rows_is_an_error() -> None:
    with pytest.raises(ValueError, match="no real vocabulary rows"):
        compute_tev(full_weight(), 0)


@dist_case(1, 2, 4)
def sharded_tev() -> tuple[float, float, int, int]:
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    shard = full_weight().chunk(world)[rank].contiguous()
    real_rows_here = max(0, min(shard.shape[0], VOCAB - rank * shard.shape[0]))
    stats = compute_tev(shard, VOCAB, group=dist.group.WORLD)
    return stats.mean, stats.std, stats.count, real_rows_here


@pytest.mark.slow
@pytest.mark.parametrize("tp", [1, 2, 4])
def test_sharded_matches_numpy(tp: int) -> None:
    per_rank = dist_result(__name__, tp, "sharded_tev")
    mean, std = reference(full_weight(), VOCAB)
    for rank_mean, rank_std, count, _ in per_rank:
        assert count == VOCAB
        assert rank_mean == pytest.approx(mean, rel=1e-6)
        assert rank_std == pytest.approx(std, rel=1e-5)
    if tp == 4:
        # The layout really has a shard of padding only (rows 192..255) and a nearly empty one.
        assert [r[3] for r in per_rank] == [64, 64, 2, 0]
