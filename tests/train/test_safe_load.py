"""A checkpoint cannot run code: a `__reduce__` payload in any of its files, the manifest rewritten
to match, is refused at resume and at export with one line, and the payload never runs."""

from __future__ import annotations

import inspect
import os
import shutil
from pathlib import Path

import pytest
import torch

from mlra_mega.cli import main
from mlra_mega.train.checkpoint import _write_manifest
from mlra_mega.train.safe_load import UnsafeCheckpoint, safe_load
from tests.conftest import tiny_train_argv

TAG = "step00000003"


class Payload:
    """Runs a shell command when unpickled by anything but a weights-only loader."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def poisoned_copy(stopped_run: Path, tmp_path: Path, *files: str) -> tuple[Path, Path]:
    """A copy of the stopped run with `files` of each checkpoint (all .pt files when none are named)
    replaced by a payload that keeps the file's own content beside it, and the manifests rewritten
    (as a sender would)."""
    run = tmp_path / "run"
    shutil.copytree(stopped_run, run)
    marker = tmp_path / "PAYLOAD_RAN"
    for ckpt in sorted((run / "checkpoints").glob("step*")):
        for path in [ckpt / f for f in files] or sorted(ckpt.rglob("*.pt")):
            original = torch.load(path, weights_only=False)  # our own file, a test: trusted
            torch.save({"original": original, "payload": Payload(marker)}, path)
        _write_manifest(ckpt)
    return run, marker


def checkpoint_files(stopped_run: Path) -> list[str]:
    ckpt = stopped_run / "checkpoints" / TAG
    return sorted(str(p.relative_to(ckpt)) for p in ckpt.rglob("*.pt"))


def test_the_checkpoint_has_every_kind_of_file(stopped_run: Path) -> None:
    names = checkpoint_files(stopped_run)
    assert {"sidecar.pt", "rng/rank00000.pt", "mp_rank_00_model_states.pt",
            "zero_pp_rank_0_mp_rank_00_optim_states.pt"} <= set(names)
    assert not any(n.startswith("model/") for n in names)  # the weights are in DeepSpeed's files, once


# What a resume reads; None: all.
RESUME_READS = ["sidecar.pt", "rng/rank00000.pt", "mp_rank_00_model_states.pt",
                "zero_pp_rank_0_mp_rank_00_optim_states.pt", None]


@pytest.mark.parametrize("file", RESUME_READS, ids=[f or "every-file" for f in RESUME_READS])
def test_a_payload_in_any_file_is_refused_at_resume(file: str | None, stopped_run: Path, tmp_path: Path,
                                                   tokenizer_dir: Path, sample_dataset: str,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    run, marker = poisoned_copy(stopped_run, tmp_path, *([file] if file else []))
    before = (run / "metrics.jsonl").read_text()
    status = main(tiny_train_argv(tokenizer_dir, sample_dataset, run, "train.steps=4", "checkpoint.interval=1",
                                  "checkpoint.keep=3", "zero.stage=1"))
    err = capsys.readouterr().err
    assert not marker.exists(), "the payload ran"
    assert status == 2
    last = err.strip().splitlines()[-1]
    assert last.startswith("mlra-mega: error: checkpoint:") and (file or ".pt").split("/")[-1] in last
    assert "more than tensors and plain data" in last and "Traceback" not in err
    assert (run / "metrics.jsonl").read_text() == before  # no step ran on top of it


@pytest.mark.parametrize("file", ["sidecar.pt", "mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt",
                                  None], ids=["sidecar", "model-states", "optim-states", "every-file"])
def test_a_payload_is_refused_at_export(file: str | None, stopped_run: Path, tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    run, marker = poisoned_copy(stopped_run, tmp_path, *([file] if file else []))
    status = main(["export-hf", str(run), str(tmp_path / "hf")])
    err = capsys.readouterr().err
    assert not marker.exists(), "the payload ran"
    assert status == 2 and "more than tensors and plain data" in err and "Traceback" not in err
    assert not (tmp_path / "hf").exists()


@pytest.mark.parametrize("how,file", [("reshard", None), ("reshard", "zero_pp_rank_0_mp_rank_00_optim_states.pt"),
                                      ("resume at ZeRO-2", "zero_pp_rank_0_mp_rank_00_optim_states.pt")],
                         ids=["reshard-every-file", "reshard-optim-states", "resume-on-another-layout"])
def test_a_payload_is_refused_when_resharding(how: str, file: str | None, stopped_run: Path, tmp_path: Path,
                                              tokenizer_dir: Path, sample_dataset: str,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    """Resharding reads DeepSpeed's files itself (`elastic.read_state`): through the safe loader too."""
    run, marker = poisoned_copy(stopped_run, tmp_path, *([file] if file else []))
    if how == "reshard":
        status = main(["reshard", str(run), str(tmp_path / "out"), "--tensor", "2"])
    else:
        status = main(tiny_train_argv(tokenizer_dir, sample_dataset, run, "train.steps=4", "checkpoint.interval=1",
                                      "checkpoint.keep=3", "zero.stage=2"))
    out, err = capsys.readouterr()
    assert not marker.exists(), "the payload ran"
    assert status == 2 and "more than tensors and plain data" in err and "Traceback" not in err, err[-3000:]
    if how != "reshard":
        assert "resharding TP1 x DP1 ZeRO-1 -> TP1 x DP1 ZeRO-2" in out + err, (out + err)[-3000:]
    else:
        assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("*.pt"))


def test_deepspeed_still_loads_unsafely_without_the_shim() -> None:
    """Canary: once DeepSpeed's engine loads weights-only itself, `CheckpointFiles.load` need not route reads."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    assert "weights_only=False" in inspect.getsource(TorchCheckpointEngine.load)


def test_safe_load_refuses_a_payload_and_reads_plain_data(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    torch.save({"w": torch.ones(2), "p": Payload(marker)}, tmp_path / "bad.pt")
    with pytest.raises(UnsafeCheckpoint, match="bad.pt holds more than tensors"):
        safe_load(tmp_path / "bad.pt")
    assert not marker.exists()
    torch.save({"w": torch.ones(2), "n": [1, "a"]}, tmp_path / "good.pt")
    assert safe_load(tmp_path / "good.pt")["n"] == [1, "a"]
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(UnsafeCheckpoint, match="junk.pt"):
        safe_load(tmp_path / "junk.pt")
