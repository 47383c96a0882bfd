"""Bad input, as a hostile or careless user gives it: one line on stderr, exit status 2, no traceback,
nothing left behind.

Each row of BAD_INPUTS is one case: how to build its world (files it needs), the command (run
in-process through the CLI's `main(argv)`), a word the one-line message must contain, and the
paths whose state must not change (every other file under the case's directory must be as
before, but rank logs). Cases that need more than a command (a full disk, a held run
directory) are tests below, counted in the suite too; the suite prints how many it covers.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from mlra_mega.cli import main
from tests.conftest import QUICKSTART, tiny_train_argv

# Names of the cases tested outside the table, for the count the suite prints.
EXTRA_CASES = ["full disk during a checkpoint", "a second run into a held run directory",
               "credentials in tracking.uri (files, logs, batch script)", "read-only tracking store",
               "permanent tracking failure vs outage", "alias bomb: bounded time and message",
               *(f"payload in {f} (tests/train/test_safe_load.py)" for f in (
                   "sidecar.pt", "rng/", "DeepSpeed model states", "ZeRO optimizer states", "every file",
                   "sidecar.pt at export", "model states at export", "optimizer states at export", "every file at export"))]


@dataclass
class World:
    """The case's own directory and the session's tokenizer, dataset and stopped run."""

    root: Path
    tok: Path
    ds: str
    stopped: Path

    def run_copy(self) -> Path:
        run = self.root / "run"
        if not run.exists():
            shutil.copytree(self.stopped, run)
        return run

    def ds_copy(self) -> str:
        prefix = self.root / "data" / "corpus"
        if not prefix.parent.exists():
            prefix.parent.mkdir()
            for ext in (".bin", ".idx", ".json"):
                shutil.copy(f"{self.ds}{ext}", f"{prefix}{ext}")
        return str(prefix)

    def train(self, *extra: str, run: Path | None = None, ds: str | None = None) -> list[str]:
        return tiny_train_argv(self.tok, ds or self.ds, run or self.root / "new-run", *extra)


@dataclass
class BadInput:
    name: str
    argv: Callable[[World], list[str]]
    word: str  # in the one-line message
    status: int = 2


def yaml_file(text: str) -> Callable[[World], str]:
    def make(w: World) -> str:
        path = w.root / "cfg.yaml"
        path.write_text(text)
        return str(path)
    return make


def binary_yaml(w: World) -> str:
    path = w.root / "bin.yaml"
    path.write_bytes(b"\xff\xfe\x00model")
    return str(path)


def cut_gz(w: World) -> str:
    data = gzip.compress(("".join(json.dumps({"text": f"document {i} " * 20}) + "\n" for i in range(400))).encode())
    path = w.root / "cut.jsonl.gz"
    path.write_bytes(data[: len(data) // 2])
    return str(path)


def not_gz(w: World) -> str:
    path = w.root / "plain.jsonl.gz"
    path.write_text(json.dumps({"text": "hello"}) + "\n")
    return str(path)


def plain_jsonl(w: World) -> str:
    path = w.root / "plain.jsonl"
    path.write_text("".join(json.dumps({"text": f"document {i} " * 20}) + "\n" for i in range(100)))
    return str(path)


def under_a_file(w: World) -> Path:
    (w.root / "a-file").write_text("x")
    return w.root / "a-file" / "out"


def bin_cut(w: World) -> str:
    prefix = w.ds_copy()
    with open(f"{prefix}.bin", "r+b") as f:
        f.truncate(os.path.getsize(f"{prefix}.bin") // 2)
    return prefix


def other_idx(w: World) -> str:
    """The .idx of a smaller dataset (first documents only) beside the session's .bin and card."""
    from mlra_mega.data.preprocess import Progress, preprocess

    prefix = w.ds_copy()
    docs = w.root / "few.jsonl"
    docs.write_text("".join(json.dumps({"text": f"a short document number {i}"}) + "\n" for i in range(50)))
    preprocess([docs], w.tok, w.root / "few", progress=Progress(None, interactive=False, log=lambda s: None))
    shutil.copy(w.root / "few.idx", f"{prefix}.idx")
    return prefix


def card_without_tokenizer(w: World) -> str:
    prefix = w.ds_copy()
    card = json.loads(Path(f"{prefix}.json").read_text())
    del card["tokenizer"]
    Path(f"{prefix}.json").write_text(json.dumps(card))
    return prefix


def corrupt_sqlite(w: World) -> str:
    path = w.root / "mlflow.db"
    path.write_bytes(b"this is not a database" * 10)
    return f"sqlite:///{path}"


def every_checkpoint_cut(w: World) -> Path:
    run = w.run_copy()
    for ckpt in (run / "checkpoints").glob("step*"):
        with open(ckpt / "sidecar.pt", "r+b") as f:
            f.truncate(10)
    return run


def metrics_without_checkpoint(w: World) -> Path:
    run = w.run_copy()
    shutil.rmtree(run / "checkpoints")
    return run


def rng_deleted_manifest_edited(w: World) -> Path:
    run = w.run_copy()
    for ckpt in (run / "checkpoints").glob("step*"):
        shutil.rmtree(ckpt / "rng")
        manifest = json.loads((ckpt / "manifest.json").read_text())
        manifest["files"] = {k: v for k, v in manifest["files"].items() if not k.startswith("rng/")}
        (ckpt / "manifest.json").write_text(json.dumps(manifest))
    return run


def tampered_sidecar(w: World) -> Path:
    from mlra_mega.train.checkpoint import _write_manifest

    run = w.run_copy()
    ckpt = run / "checkpoints" / "step00000003"
    (ckpt / "sidecar.pt").write_bytes(b"\x80\x04\x95" + os.urandom(64))  # a pickle header, then noise
    _write_manifest(ckpt)
    return run


BOMB = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{c}: &{c} [{', '.join([f'*{p}'] * 9)}]\n" for p, c in zip("abcdefgh", "bcdefghi")) + "model:\n  num_layers: *i\n"
SUBMIT = ["submit", str(QUICKSTART), "--cpu", "--dry-run"]

BAD_INPUTS = [
    # -- values that cannot mean anything
    BadInput("lr inf", lambda w: ["config", "optim.lr=inf"], "finite"),
    BadInput("weight decay nan", lambda w: ["config", "optim.weight_decay=nan"], "finite"),
    BadInput("init std inf", lambda w: ["config", "model.init_std=inf"], "finite"),
    BadInput("clip nan", lambda w: ["config", "optim.clip_grad=nan"], "finite"),
    BadInput("beta nan", lambda w: ["config", "optim.betas=[0.9,nan]"], "finite"),
    BadInput("lr overflow", lambda w: ["config", "optim.lr=1e999"], "finite"),
    BadInput("eps < 0", lambda w: ["config", "optim.eps=-1e-8"], "optim.eps"),
    BadInput("seed < 0", lambda w: ["config", "train.seed=-1"], "train.seed"),
    BadInput("data seed too big", lambda w: ["config", f"data.seed={2**40}"], "data.seed"),
    BadInput("lr inf in a run", lambda w: w.train("optim.lr=inf"), "optim.lr"),
    # -- YAML
    BadInput("duplicated key", lambda w: ["config", yaml_file("model:\n  num_layers: 2\n  num_layers: 3\n")(w)],
             "duplicated key"),
    BadInput("duplicated section", lambda w: ["config", yaml_file("train:\n  steps: 2\ntrain:\n  steps: 3\n")(w)],
             "duplicated key"),
    BadInput("alias bomb", lambda w: ["config", yaml_file(BOMB)(w)], "aliases"),
    BadInput("recursive alias", lambda w: ["config", yaml_file("model: &m\n  x: *m\n")(w)], "config"),
    BadInput("long value", lambda w: ["config", "model.num_layers=" + "9x" * 50_000], "expected an integer"),
    BadInput("not UTF-8 YAML", lambda w: ["config", binary_yaml(w)], "config"),
    # -- paths and names
    BadInput("run.name escapes run.root", lambda w: w.train("run.name=../../x", "run.dir=null"), "run.name"),
    BadInput("run.name with a newline", lambda w: w.train("run.name=x\ntouch F", "run.dir=null"), "run.name"),
    BadInput("experiment with a slash", lambda w: w.train("tracking.experiment=a/b", "run.dir=null"),
             "tracking.experiment"),
    BadInput("run.dir with a newline", lambda w: w.train(run=w.root / "a\nb"), "run.dir"),
    # -- the batch script
    BadInput("job name injection", lambda w: [*SUBMIT, "--job-name", "x\ntouch F"], "--job-name"),
    BadInput("time injection", lambda w: [*SUBMIT, "--time", "1:00:00\ntouch F"], "--time"),
    BadInput("partition injection", lambda w: [*SUBMIT, "--partition", "gpu;touch F"], "--partition"),
    BadInput("account injection", lambda w: [*SUBMIT, "--account", "$(touch F)"], "--account"),
    BadInput("run.name injection at submit", lambda w: [*SUBMIT, "run.name=x\ntouch F"], "run.name"),
    BadInput("run.dir with shell characters at submit", lambda w: [*SUBMIT, f"run.dir={w.root}/a;touch F"],
             "run.dir"),
    # -- tracking stores that can never work
    BadInput("unknown tracking scheme", lambda w: w.train("tracking.enabled=true", "tracking.uri=htp://x"),
             "tracking.uri"),
    BadInput("tracking URI without host", lambda w: w.train("tracking.enabled=true", "tracking.uri=http://"),
             "tracking.uri"),
    BadInput("tracking port out of range", lambda w: w.train("tracking.enabled=true",
                                                             "tracking.uri=http://127.0.0.1:99999"), "tracking.uri"),
    BadInput("corrupt sqlite store", lambda w: w.train("tracking.enabled=true", f"tracking.uri={corrupt_sqlite(w)}"),
             "not a SQLite database"),
    # -- data
    BadInput("preprocess: gzip cut short", lambda w: ["preprocess", "--input", cut_gz(w), "--tokenizer", str(w.tok),
                                                      "--output-prefix", str(w.root / "out")], "cut short"),
    BadInput("preprocess: not gzip", lambda w: ["preprocess", "--input", not_gz(w), "--tokenizer", str(w.tok),
                                                "--output-prefix", str(w.root / "out")], "not a gzip file"),
    BadInput("tokenizer: gzip cut short", lambda w: ["tokenizer", "train", "--input", cut_gz(w), "--vocab-size",
                                                     "300", "--output", str(w.root / "tok")], "cut short"),
    BadInput("tokenizer: not gzip", lambda w: ["tokenizer", "train", "--input", not_gz(w), "--vocab-size", "300",
                                               "--output", str(w.root / "tok")], "not a gzip file"),
    BadInput("preprocess: unwritable output", lambda w: ["preprocess", "--input", plain_jsonl(w), "--tokenizer",
                                                         str(w.tok), "--output-prefix", str(under_a_file(w) / "p")],
             "cannot write"),
    BadInput("tokenizer: unwritable output", lambda w: [
        "tokenizer", "train", "--input", str(QUICKSTART), "--vocab-size", "40", "--output", str(under_a_file(w))],
        "cannot write"),
    BadInput(".bin shorter than its .idx", lambda w: w.train(f"data.paths=[{bin_cut(w)}]"), ".bin has"),
    BadInput(".idx of another dataset", lambda w: w.train(f"data.paths=[{other_idx(w)}]"), "does not match its card"),
    BadInput("card without its tokenizer", lambda w: w.train(f"data.paths=[{card_without_tokenizer(w)}]"),
             "does not name its tokenizer"),
    # -- checkpoints
    BadInput("every checkpoint unusable", lambda w: w.train("train.steps=4", run=every_checkpoint_cut(w)),
             "no usable checkpoint"),
    BadInput("metrics but no checkpoint", lambda w: w.train("train.steps=4", run=metrics_without_checkpoint(w)),
             "no checkpoint to continue"),
    BadInput("resume PATH of a finished run", lambda w: [*w.train("train.steps=2"), "--resume",
                                                         str(w.stopped / "checkpoints" / "step00000002")],
             "step00000002 already finished"),
    BadInput("manifest edited to match a deleted rng/", lambda w: w.train("train.steps=4",
                                                                          run=rng_deleted_manifest_edited(w)),
             "RNG states"),
    BadInput("tampered pickle", lambda w: w.train("train.steps=4", run=tampered_sidecar(w)), "sidecar.pt"),
]


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every file under root with its size and mtime, rank logs left out (they record the attempt)."""
    out = {}
    for p in root.rglob("*"):
        if p.is_file() and "logs" not in p.relative_to(root).parts:
            st = p.stat()
            out[str(p.relative_to(root))] = (st.st_size, st.st_mtime_ns)
    return out


@pytest.fixture
def world(tmp_path: Path, tokenizer_dir: Path, sample_dataset: str, stopped_run: Path,
          monkeypatch: pytest.MonkeyPatch) -> World:
    monkeypatch.chdir(tmp_path)  # a `touch F` that ran would land here
    monkeypatch.setenv("MLRA_MEGA_CACHE", str(tmp_path / "cache"))
    return World(tmp_path / "case", tokenizer_dir, sample_dataset, stopped_run)


@pytest.mark.parametrize("case", BAD_INPUTS, ids=[c.name for c in BAD_INPUTS])
def test_bad_input_ends_in_one_line(case: BadInput, world: World, capsys: pytest.CaptureFixture[str]) -> None:
    world.root.mkdir()
    argv = case.argv(world)
    before = snapshot(world.root)
    capsys.readouterr()
    status = main(argv)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    last = err.rstrip("\n").splitlines()[-1] if err.strip() else ""
    assert status == case.status, f"exit {status}, stderr: {err[-2000:]}"
    assert last.startswith("mlra-mega: error: ") and case.word in last, last
    assert len(last) <= 2100, "an error message is bounded"
    after = snapshot(world.root)
    assert {k: v for k, v in after.items() if not k.startswith("cache/")} == before, "the case left output behind"
    assert not (world.root.parent / "F").exists() and not Path("F").exists(), "an injected command ran"
    assert not (world.root.parent.parent / "x").exists(), "a run escaped run.root"


def test_alias_bomb_is_refused_fast_and_briefly(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "bomb.yaml"
    path.write_text(BOMB)
    assert len(BOMB) < 500
    start = time.perf_counter()
    assert main(["config", str(path)]) == 2
    assert time.perf_counter() - start < 2.0
    assert len(capsys.readouterr().err) < 400


def test_a_full_disk_during_a_checkpoint_loses_nothing(world: World, monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    import errno

    import torch

    from mlra_mega.train import checkpoint

    run = world.run_copy()
    real_save = torch.save

    def full(obj, path, *args, **kwargs):  # noqa: ANN001 - torch.save's signature
        if "step00000004" in str(path):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(checkpoint.torch, "save", full)
    status = main(world.train("train.steps=4", "checkpoint.interval=1", "checkpoint.keep=3", "zero.stage=1", run=run))
    err = capsys.readouterr().err
    assert status == 2 and "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert "No space left on device" in last and "step00000003 is still the latest complete checkpoint" in last
    assert (run / "checkpoints" / "latest").read_text().strip() == "step00000003"
    from mlra_mega.train.checkpoint import find_checkpoint

    assert find_checkpoint(run, verify_hashes=True).tag == "step00000003"


def test_a_second_run_into_a_held_run_directory_is_refused(world: World, capsys: pytest.CaptureFixture[str]) -> None:
    from mlra_mega.train.run_lock import LOCK

    run = world.run_copy()
    holder = subprocess.Popen(["sleep", "60"])
    try:
        (run / LOCK).write_text(json.dumps({"host": socket.gethostname(), "pid": holder.pid, "slurm_job_id": "77",
                                            "renewed": time.time()}))
        before = (run / "metrics.jsonl").read_text()
        assert main(world.train("train.steps=4", run=run)) == 2
        last = capsys.readouterr().err.strip().splitlines()[-1]
        assert "is in use by another run" in last and f"pid {holder.pid}" in last and "Slurm job 77" in last
        assert (run / "metrics.jsonl").read_text() == before
        assert json.loads((run / LOCK).read_text())["pid"] == holder.pid  # the holder keeps it
    finally:
        holder.kill()
        holder.wait()


def pytest_bad_input_count() -> int:
    return len(BAD_INPUTS) + len(EXTRA_CASES)


def test_credentials_in_the_tracking_uri_are_never_written(world: World, monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    from mlra_mega import slurm
    from mlra_mega.config import flatten, load_config, public_dict
    from mlra_mega.train.checkpoint import find_checkpoint, read_sidecar

    with socket.socket() as s:  # a port nobody listens on: the server is "down", the run goes on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    uri = f"http://alice:s3cr3t-pw@127.0.0.1:{port}/?token=t0k3n"
    run = world.root / "run"
    world.root.mkdir()
    assert main(world.train("train.steps=2", "tracking.enabled=true", f"tracking.uri={uri}",
                            "tracking.final_flush_s=0", run=run)) == 0
    out = capsys.readouterr()
    written = [run / "config.yaml", *(run / "logs").glob("*.log")]
    for text in [out.out, out.err, *(p.read_text() for p in written),
                 repr(read_sidecar(find_checkpoint(run))["config"]),
                 repr(flatten(public_dict(load_config(None, [f"tracking.uri={uri}"]))))]:  # what MLflow's params get
        assert "s3cr3t-pw" not in text and "t0k3n" not in text
    assert f"http://***@127.0.0.1:{port}/?token=***" in (run / "config.yaml").read_text()

    # The batch script gets the URI without credentials; sbatch's environment carries them.
    argv = ["submit", str(QUICKSTART), "--cpu", f"tracking.uri={uri}", f"run.dir={world.root / 'job'}"]
    assert main([*argv, "--dry-run"]) == 0
    script = capsys.readouterr().out
    assert "s3cr3t-pw" not in script and "t0k3n" not in script and f"tracking.uri=http://127.0.0.1:{port}/" in script
    calls = []
    monkeypatch.setattr(slurm.shutil, "which", lambda name: "/usr/bin/sbatch")
    monkeypatch.setattr(slurm.subprocess, "run", lambda cmd, **kw: calls.append((cmd, kw)) or subprocess.CompletedProcess(
        cmd, 0, stdout="42\n", stderr=""))
    assert main(argv) == 0
    (cmd, kw), = [c for c in calls if c[0][0] == "sbatch"]  # (submit --cpu also asks sinfo about the nodes)
    assert "s3cr3t-pw" not in Path(cmd[-1]).read_text()
    assert kw["env"]["MLFLOW_TRACKING_USERNAME"] == "alice" and kw["env"]["MLFLOW_TRACKING_PASSWORD"] == "s3cr3t-pw"
    assert kw["env"]["MLFLOW_TRACKING_TOKEN"] == "t0k3n"


@pytest.fixture
def read_only_dir(tmp_path: Path):
    """A directory on a file system mounted read-only (root bypasses file modes, not a ro mount)."""
    where = tmp_path / "ro"
    where.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(where)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        yield where
    finally:
        subprocess.run(["umount", str(where)], capture_output=True)


def test_a_read_only_tracking_store_is_an_error_not_an_outage(world: World, read_only_dir: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    import sqlite3

    db = read_only_dir / "mlflow.db"
    sqlite3.connect(db).execute("create table t (x)").connection.close()
    subprocess.run(["mount", "-o", "remount,ro", str(read_only_dir)], check=True)
    world.root.mkdir()
    assert main(world.train("tracking.enabled=true", f"tracking.uri=sqlite:///{db}")) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert "read-only" in last and "tracking.uri" in last and not (world.root / "new-run").exists()


def test_permanent_tracking_failures_are_told_apart_from_outages() -> None:
    from mlra_mega.tracking.mlflow import _permanent

    assert _permanent(Exception("(sqlite3.OperationalError) attempt to write a readonly database"))
    assert _permanent(Exception("(sqlite3.DatabaseError) file is not a database"))
    assert _permanent(Exception("API request failed with error code 401 != 200 ... HTTP"))
    assert _permanent(ConnectionRefusedError("[Errno 111] Connection refused")) is None
    assert _permanent(TimeoutError("timed out")) is None
