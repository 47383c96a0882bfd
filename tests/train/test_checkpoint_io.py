"""How checkpoint files are written: the parts merge that publishes a checkpoint, and the async
snapshot's buffers, reused at the next save without ever changing a write still in flight."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
import torch

from mlra_mega.errors import MlraMegaError
from mlra_mega.train.checkpoint_io import MANIFEST, CheckpointFiles, merge_parts, write_part
from mlra_mega.train.safe_load import safe_load


def test_a_part_no_rank_0_can_see_is_named_and_nothing_is_published(tmp_path: Path) -> None:
    """Rank 1's part missing on rank 0 (checkpoint.dir not shared by the ranks): a clear error
    naming the rank and the fix, and no manifest, so the checkpoint never counts."""
    tag = tmp_path / "step00000002"
    tag.mkdir()
    (tag / "a.pt").write_bytes(b"x" * 10)
    write_part(tag, 0, [tag / "a.pt"], "sha256")
    with pytest.raises(MlraMegaError, match=r"1 rank\(s\).*rank00001\.json.*one filesystem that all of them see"):
        merge_parts(tag, 2, "sha256", timeout_s=0.2)
    assert not (tag / MANIFEST).exists()
    (tag / "b.pt").write_bytes(b"y" * 3)
    write_part(tag, 1, [tag / "b.pt"], "sha256")
    merge_parts(tag, 2, "sha256", timeout_s=0.2)
    manifest = json.loads((tag / MANIFEST).read_text())
    assert {k: v["size"] for k, v in manifest["files"].items()} == {"a.pt": 10, "b.pt": 3}
    assert not (tag / "parts").exists()


def test_async_snapshots_reuse_their_buffers_only_once_the_write_is_done(tmp_path: Path, monkeypatch) -> None:
    files, gate = CheckpointFiles(), threading.Event()
    write = CheckpointFiles._write
    monkeypatch.setattr(CheckpointFiles, "_write", staticmethod(lambda data, path, kill=False: (
        gate.wait(10), write(data, path, kill))))
    weights = {"w": torch.arange(6.0), "moments": [torch.ones(2, 2)], "step": 1}
    files.asynchronous = True
    gate.set()
    (tmp_path / "s1").mkdir()
    files.save(weights, str(tmp_path / "s1" / "model.pt"))
    files.wait()
    first = files._staging["model.pt"]
    weights["w"] += 1  # training goes on: the next save copies into the same memory
    weights["moments"][0].mul_(3)
    gate.clear()
    (tmp_path / "s2").mkdir()
    files.save(weights, str(tmp_path / "s2" / "model.pt"))
    second = files._staging["model.pt"]
    assert second["w"].data_ptr() == first["w"].data_ptr()
    assert second["moments"][0].data_ptr() == first["moments"][0].data_ptr()
    # While s2's write waits, a third save of the same file may not touch the buffers it reads.
    (tmp_path / "s3").mkdir()
    weights["w"] += 1
    files.save(weights, str(tmp_path / "s3" / "model.pt"))
    assert files._staging["model.pt"]["w"].data_ptr() != second["w"].data_ptr()
    gate.set()
    files.wait()
    for step, offset, scale in (("s1", 0, 1), ("s2", 1, 3), ("s3", 2, 3)):
        saved = safe_load(str(tmp_path / step / "model.pt"))
        assert torch.equal(saved["w"], torch.arange(6.0) + offset), step
        assert torch.equal(saved["moments"][0], torch.full((2, 2), float(scale))) and saved["step"] == 1


def test_a_preemption_waits_for_the_pending_async_save_before_its_own(tmp_path: Path, monkeypatch,
                                                                      tokenizer_dir: Path, sample_dataset: str) -> None:
    """SIGUSR1 while step 2's background save is still writing (each of its files held 1 s): the
    preemption's save of step 3 starts only once every file of step 2 is on disk, both checkpoints
    are complete, and `latest` is the preemption's."""
    import os
    import signal
    import time

    from mlra_mega.config import load_config
    from mlra_mega.train.callbacks import Callback
    from mlra_mega.train.checkpoint import find_checkpoint
    from mlra_mega.train.run import train
    from mlra_mega.train.signals import PREEMPTED
    from tests.train.test_checkpoint import overrides

    events: list[tuple[str, float, str]] = []
    write = CheckpointFiles._write

    def slow_write(data, path, kill=False):
        background = threading.current_thread().name == "checkpoint-writer"
        events.append(("begin", time.monotonic(), str(path)))
        if background:
            time.sleep(1.0)
        write(data, path, kill)
        events.append(("end", time.monotonic(), str(path)))

    monkeypatch.setattr(CheckpointFiles, "_write", staticmethod(slow_write))

    class Preempt(Callback):
        def on_step_start(self, trainer) -> None:
            if trainer.step == 3:
                os.kill(os.getpid(), signal.SIGUSR1)

    run = tmp_path / "run"
    cfg = load_config(None, overrides(tokenizer_dir, sample_dataset, run, "tracking.enabled=false", "train.steps=6",
                                      "checkpoint.interval=2", "checkpoint.async=true", "checkpoint.keep=5"))
    train(cfg, callbacks=[Preempt()], log=lambda s: None)
    assert json.loads((run / PREEMPTED).read_text())["step"] == 3
    step2 = [t for kind, t, p in events if "step00000002" in p]
    step3 = [t for kind, t, p in events if kind == "begin" and "step00000003" in p]
    assert step2 and step3 and max(step2) < min(step3), "the preemption's save began before step 2's was written"
    for tag in ("step00000002", "step00000003"):
        assert (run / "checkpoints" / tag / MANIFEST).is_file(), tag
    assert find_checkpoint(run / "checkpoints").tag == "step00000003"
    assert (run / "checkpoints" / "latest").read_text().strip() == "step00000003"
