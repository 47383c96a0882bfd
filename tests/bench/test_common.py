"""The benchmark helpers: statistics, the depth fit, the table, the step clock's profile, and the
per-rank memory accounting of bench/trainer_worker.py against what ZeRO must do at DP = 2."""

from __future__ import annotations

import os
import subprocess
import sys
import json
from pathlib import Path

import pytest

from bench.common import StepClock, spread, steady, table
from bench.depth import linear_fit

REPO = Path(__file__).resolve().parents[2]


def test_spread_and_steady() -> None:
    s = spread([3.0, 1.0, 2.0, 10.0])
    assert (s["median"], s["min"], s["max"], s["n"]) == (2.5, 1.0, 10.0, 4)
    assert s["range_pct"] == pytest.approx(360.0)
    assert steady([9.0, 9.0, 1.0, 2.0, 3.0], warmup=2) == 2.0
    with pytest.raises(ValueError, match="warm-up"):
        steady([1.0, 2.0], warmup=2)


def test_linear_fit_recovers_a_line_and_its_least_squares_slope() -> None:
    a, b = linear_fit([4, 8, 16, 32], [1.0 + 0.5 * x for x in (4, 8, 16, 32)])
    assert (a, b) == (pytest.approx(1.0), pytest.approx(0.5))
    a, b = linear_fit([0, 1, 2], [0.0, 2.0, 1.0])  # hand-computed: b = 0.5, a = 0.5
    assert (a, b) == (pytest.approx(0.5), pytest.approx(0.5))


def test_table_aligns_columns() -> None:
    out = table(["name", "ms"], [["a", 1.5], ["longer", 12345.0]], title="t").splitlines()
    assert out[0] == "t" and out[1].startswith("name  ") and out[3].endswith("1.5") and out[4].endswith("12,345")
    assert len({len(line) for line in out[1:]}) == 1


def _worker(tmp_path: Path, tokenizer_dir: Path, dataset: str, stage: int) -> dict:
    out = tmp_path / f"z{stage}.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           str(REPO / "bench" / "trainer_worker.py"), "--result", str(out), "model.num_layers=2",
           "model.hidden_size=64", "model.num_heads=4", "model.seq_length=32", f"data.tokenizer={tokenizer_dir}",
           f"data.paths=[{dataset}]", f"zero.stage={stage}", "train.steps=2", "train.global_batch_size=4",
           "train.micro_batch_size=2"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO)))
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(out.read_text())


@pytest.mark.slow
def test_per_rank_bytes_follow_the_zero_stage(tmp_path: Path, tokenizer_dir: Path, sample_dataset: str) -> None:
    """ZeRO-1 halves each rank's optimizer state at DP = 2 (DeepSpeed pads its flat partitions by
    a few elements) and adds its fp32 partition; ZeRO-3 halves the parameters themselves."""
    z0, z1, z3 = (_worker(tmp_path, tokenizer_dir, sample_dataset, s) for s in (0, 1, 3))
    n = z0["parameters"]
    for rank in range(2):
        assert z0["ranks"][rank]["param_bytes"] == 4 * n
        assert z0["ranks"][rank]["optimizer_state_bytes"] == 2 * 4 * n  # exp_avg and exp_avg_sq, fp32
        assert z0["ranks"][rank]["optimizer_param_copy_bytes"] == 0
        assert z1["ranks"][rank]["optimizer_state_bytes"] == pytest.approx(4 * n, rel=1e-3)
        assert z1["ranks"][rank]["optimizer_param_copy_bytes"] == pytest.approx(2 * n, rel=1e-3)
        assert z3["ranks"][rank]["param_bytes"] == pytest.approx(2 * n, rel=1e-3)
        assert z3["ranks"][rank]["optimizer_state_bytes"] == pytest.approx(4 * n, rel=1e-3)


def test_step_clock_profiles_exactly_the_chosen_steps() -> None:
    """Steps 3 and 4 profiled (after step 2's end, to step 4's): one 64x64 matmul in step 3 and two
    in step 4 are 1.5 calls a step; step 5's matmul is outside the profile."""
    import torch

    clock = StepClock(profile=(2, 2))
    x = torch.ones(64, 64)
    for matmuls in (0, 0, 1, 2, 1):
        for _ in range(matmuls):
            x @ x
        clock.tick()
    rows = {r["op"]: r for r in clock.profiled}
    assert rows["aten::mm"]["calls_per_step"] == 1.5
    assert len(clock.times) == 4 and clock._prof is None


def test_median_interval_takes_the_order_statistics_of_its_coverage() -> None:
    from bench.common import median_interval

    eight = median_interval([8, 1, 7, 2, 6, 3, 5, 4])  # k = 2: 1 - 2 * 9/256 = 0.9297 >= 0.9; k = 3: 0.71
    assert (eight["low"], eight["high"]) == (2, 7) and abs(eight["coverage"] - (1 - 18 / 256)) < 1e-12
    three = median_interval([3, 1, 2])  # too few for 90%: the range, with its 75%
    assert (three["low"], three["high"], three["coverage"]) == (1, 3, 0.75)
