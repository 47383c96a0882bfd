"""Two Slurm nodes on one machine (`scripts/slurm_local.sh start --nodes 2`: node1 and node2, each
in its own network namespace on one bridge, a cluster of their own), through
`mlra-mega submit --nodes 2 --cpu`; MLflow is a server on node1's address.

TP=2 inside each node x DP=2 across them completes and equals the one-node torchrun run of the
same layout within 1e-6; `scancel --signal=USR1` stops every rank on both nodes at one step with
a checkpoint, and the requeued job ends like the uninterrupted one; SIGKILL of a task on node2
ends the job within 60 s with the rank and its host named, and a resubmission resumes; node2
failing mid-run (its link cut: nothing from it arrives any more) ends the job as a node failure,
Slurm requeues it, and it resumes from the last complete checkpoint once the node is back; a job
submitted with `--nodes 1-2` whose second node stays down is requeued onto node1 alone (DP
halves) and continues from the two-node checkpoint. `stop` leaves no namespace, link, hosts
entry or daemon behind.

"Mid-run" is made certain, not raced: the interrupted jobs stall one rank for a few seconds in
step 7 (`faults.inject_hang_*`, a drill that changes no number), and the test acts then.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from mlra_mega.cli import main
from tests.test_slurm import SLURM_DIR, batch_times, job_state, wait_done, wait_steps
from tests.tracking.test_mlflow import Server
from tests.train.test_checkpoint import REPO, overrides, steps
from tests.train.test_elastic import COMMON

SCRIPT = REPO / "scripts" / "slurm_local.sh"
CONF = SLURM_DIR / "two-nodes" / "slurm.conf"
# The layout of the elastic tests (8 steps, checkpoints at 4 and 8, dropout 0: a resume on another
# layout re-derives the RNG states), so their uninterrupted run is the one-node reference here.
LAYOUT = [*COMMON, "parallel.tensor=2"]
STEPS = 8
NODE1 = "10.77.0.11"
STALL = ["faults.inject_hang_step=7", "faults.inject_hang_rank=1", "faults.inject_hang_s=5"]

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(os.geteuid() != 0 or shutil.which("ip") is None or shutil.which("nsenter") is None,
                                 reason="needs root, ip and nsenter for the nodes' network namespaces"),
              pytest.mark.skipif(shutil.which("apt-get") is None and shutil.which("slurmctld") is None,
                                 reason="needs Slurm or apt-get to install it")]


def node_states() -> dict[str, str]:
    proc = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %T"], capture_output=True, text=True,
                          env=dict(os.environ, SLURM_CONF=str(CONF)))
    return dict(line.split() for line in proc.stdout.splitlines() if line.strip())


def both_up() -> bool:
    states = node_states()
    return sorted(states) == ["node1", "node2"] and all(
        s.rstrip("*") in ("idle", "mixed", "allocated") for s in states.values())


def slurm_local(*args: str) -> str:
    proc = subprocess.run(["bash", str(SCRIPT), *args], env=dict(os.environ, MLRA_SLURM_DIR=str(SLURM_DIR)),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


@pytest.fixture(scope="module")
def nodes():
    """The two-node cluster, the clients pointed at it for this module; stopped again afterwards
    when this module started it (CI starts its own)."""
    saved = {k: os.environ.get(k) for k in ("SLURM_CONF", "no_proxy", "NO_PROXY")}
    os.environ["SLURM_CONF"] = str(CONF)
    for name in ("no_proxy", "NO_PROXY"):  # the nodes' addresses never go through a proxy
        os.environ[name] = ",".join(filter(None, [saved[name], "10.77.0.11,10.77.0.12,node1,node2"]))
    was_up = both_up()
    slurm_local("start", "--nodes", "2")
    yield
    if not was_up:
        slurm_local("stop", "--nodes", "2")
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@pytest.fixture(autouse=True)
def both_nodes_up(nodes):
    """A test that takes node2 down brings it back; the next one starts with both."""
    if not both_up():
        slurm_local("node-up", "2")
    assert both_up(), node_states()


@pytest.fixture(scope="module")
def server(nodes, tmp_path_factory: pytest.TempPathFactory):
    srv = Server(tmp_path_factory.mktemp("node1-mlflow"), host=NODE1,
                 prefix=("nsenter", "--net=/var/run/netns/mlra-node1"))
    srv.start()
    yield srv
    srv.stop()


def submit(run_dir: Path, tokenizer_dir: Path, dataset: str, server: Server, *extra: str,
           nodes: str = "2") -> tuple[str, float]:
    """(job id, time of submission). --cpus-per-task is left to its --cpu default (what a node has)."""
    args = ["submit", str(REPO / "configs" / "quickstart.yaml"), "--cpu", "--nodes", nodes, "--tasks-per-node", "2",
            "--partition", "multi", "--time", "00:15:00", "--signal-lead", "60",
            *overrides(tokenizer_dir, dataset, run_dir, *LAYOUT, f"tracking.uri={server.uri}", *extra)]
    out = io.StringIO()
    t0 = time.time()
    with contextlib.redirect_stdout(out):
        assert main(args) == 0
    return re.search(r"submitted job (\d+)", out.getvalue()).group(1), t0


def mlflow_run(server: Server, run_dir: Path):
    """(client, the MLflow run of run_dir)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=server.uri)
    exp = client.get_experiment_by_name("quickstart")
    (run,) = [r for r in client.search_runs([exp.experiment_id]) if r.info.run_name == run_dir.name]
    return client, run


def mlflow_steps(server: Server, run_dir: Path) -> list[int]:
    client, run = mlflow_run(server, run_dir)
    return sorted(m.step for m in client.get_metric_history(run.info.run_id, "train/loss"))


def assert_crash_replay_in_mlflow(server: Server, run_dir: Path, reference: Path, rel: float = 1e-6) -> None:
    """After a crash MLflow cannot forget the points sent past the checkpoint (step 4): the
    resumed job logs them again, their range is in the `replayed_steps` tag, and each step's
    last value is the resumed job's, equal to the uninterrupted job's."""
    client, run = mlflow_run(server, run_dir)
    history = sorted(client.get_metric_history(run.info.run_id, "train/loss"), key=lambda m: (m.step, m.timestamp))
    logged = [m.step for m in history]
    assert sorted(set(logged)) == list(range(1, STEPS + 1))
    twice = sorted({s for s in logged if logged.count(s) > 1})
    assert twice == list(range(5, 5 + len(twice))) and len(twice) <= 2, twice  # sent before the crash in step 7
    if twice:
        assert run.data.tags["replayed_steps"] == f"5-{twice[-1]}", run.data.tags
    last = {m.step: m.value for m in history}
    for r in steps(reference):
        assert last[r["step"]] == pytest.approx(r["train/loss"], rel=rel, abs=0)


def slurm_log(run_dir: Path) -> str:
    return "".join(p.read_text() for p in sorted(run_dir.glob("slurm-*.out")))


def assert_every_step_once_like(run: Path, reference: Path, server: Server | None, rel: float = 0.0) -> None:
    """metrics.jsonl (and MLflow, unless None) hold every step once, as the reference's."""
    records = steps(run)
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    for a, b in zip(records, steps(reference), strict=True):
        assert a["train/loss"] == pytest.approx(b["train/loss"], rel=rel, abs=0), (a, b)
        assert a["train/consumed_samples"] == b["train/consumed_samples"]
    if server is not None:
        assert mlflow_steps(server, run) == list(range(1, STEPS + 1))


def wait_stalled(run: Path) -> None:
    """Until step 6 is recorded: rank 1 is then in (or about to be in) step 7's stall."""
    wait_steps(run, 6, timeout=240)
    assert len(steps(run)) == 6, "step 7 did not stall"


def tasks_of(job: str) -> dict[int, object]:
    """SLURM_PROCID -> the training process of that task."""
    import psutil

    found = {}
    for proc in psutil.process_iter():
        try:
            env, cmd = proc.environ(), " ".join(proc.cmdline())
            parent = proc.parent()
            parent_cmd = " ".join(parent.cmdline()) if parent is not None else ""
        except Exception:  # noqa: BLE001 - gone, or not ours to read
            continue
        # A task's DataLoader workers share its command line and environment: the task is the one
        # whose parent is not a training process.
        if env.get("SLURM_JOB_ID") == job and "launchers/train.py" in cmd and "launchers/train.py" not in parent_cmd:
            found[int(env["SLURM_PROCID"])] = proc
    return found


@pytest.fixture(scope="module")
def straight(server, tmp_path_factory, tokenizer_dir: Path, sample_dataset: str) -> tuple[Path, float]:
    """The uninterrupted two-node job (the reference of the interrupted ones), and its
    submit-to-start time."""
    run = tmp_path_factory.mktemp("two-nodes") / "straight"
    job, t0 = submit(run, tokenizer_dir, sample_dataset, server)
    wait_done(job)
    return run, batch_times(run)[0] - t0


def test_tp2_in_each_node_dp2_across_them_equals_one_node(straight, server: Server, elastic_straight: Path) -> None:
    run, submit_to_start = straight
    ours, ref = steps(run), steps(elastic_straight)
    assert [r["step"] for r in ours] == list(range(1, STEPS + 1))
    for a, b in zip(ours, ref, strict=True):
        assert a["train/loss"] == pytest.approx(b["train/loss"], rel=1e-6, abs=0)
        assert a["train/grad_norm"] == pytest.approx(b["train/grad_norm"], rel=1e-6, abs=0)
    assert mlflow_steps(server, run) == list(range(1, STEPS + 1))
    log = slurm_log(run)
    assert "4 processes = tensor 2 x data 2" in log and "on node[1-2]" in log, log[-2000:]
    cards = [(run / "logs" / f"rank{r:05d}.json").read_text() for r in range(4)]
    assert [re.search(r'"host": "(\w+)"', c).group(1) for c in cards] == ["node1", "node1", "node2", "node2"]
    print(f"\n[two nodes] submit-to-start {submit_to_start:.1f}s")


def test_usr1_stops_both_nodes_at_one_step_and_the_requeued_job_matches(
        straight, server: Server, tmp_path: Path, tokenizer_dir: Path, sample_dataset: str) -> None:
    from mlra_mega.train.checkpoint import is_complete

    run = tmp_path / "usr1"
    job, _ = submit(run, tokenizer_dir, sample_dataset, server, *STALL)
    wait_stalled(run)
    t_signal = time.time()
    subprocess.run(["scancel", "--signal=USR1", job], check=True)  # to the tasks, as the template's --signal
    wait_done(job)
    assert_every_step_once_like(run, straight[0], server)
    starts = batch_times(run)
    assert len(starts) == 2, "the job ran twice: before and after the requeue"
    (stop,) = re.findall(r"\[batch\] preempted \(.*\"step\": (\d+)", slurm_log(run))
    ckpt = run / "checkpoints" / f"step{int(stop):08d}"
    assert int(stop) == 7 and is_complete(ckpt)  # every rank's files, on both nodes, at that one step
    assert sorted(p.name for p in (ckpt / "rng").iterdir()) == [f"rank{r:05d}.pt" for r in range(4)]
    print(f"\n[two nodes] USR1: signal-to-restart {starts[1] - t_signal:.1f}s")


def test_sigkill_of_a_task_on_node2_ends_the_job_naming_it_and_a_resubmission_resumes(
        straight, server: Server, tmp_path: Path, tokenizer_dir: Path, sample_dataset: str) -> None:
    run = tmp_path / "killed"
    job, _ = submit(run, tokenizer_dir, sample_dataset, server, *STALL)
    wait_stalled(run)
    victim = tasks_of(job)[3]
    t_kill = time.time()
    victim.kill()
    deadline = t_kill + 120
    while job_state(job) not in (None, "FAILED", "COMPLETED", "CANCELLED") and time.time() < deadline:
        time.sleep(0.2)
    kill_to_end = time.time() - t_kill
    assert job_state(job) in (None, "FAILED") and kill_to_end < 60, job_state(job)
    log = slurm_log(run)
    assert re.search(r"srun: error: node2: task 3: Killed", log), log[-3000:]
    assert re.search(r"lost rank\(s\) (\d+ \(node\d\), )*3 \(node2\)", log), log[-3000:]
    job, _ = submit(run, tokenizer_dir, sample_dataset, server)  # Slurm does not requeue a failure
    wait_done(job)
    assert re.search(r"resuming \S+/step00000004 at step", slurm_log(run)), slurm_log(run)[-3000:]
    assert_every_step_once_like(run, straight[0], None)
    assert_crash_replay_in_mlflow(server, run, straight[0])
    print(f"\n[two nodes] SIGKILL of task 3 on node2: kill-to-exit {kill_to_end:.1f}s")


def test_node2_failing_mid_run_requeues_and_resumes_once_it_is_back(
        straight, server: Server, tmp_path: Path, tokenizer_dir: Path, sample_dataset: str) -> None:
    run = tmp_path / "node-failure"
    job, _ = submit(run, tokenizer_dir, sample_dataset, server, *STALL)
    wait_stalled(run)
    t_fail = time.time()
    slurm_local("node-down", "2")
    try:
        seen: set[str | None] = set()
        deadline = t_fail + 180
        while not (seen & {"NODE_FAIL", "PENDING", "REQUEUED"}) and time.time() < deadline:
            seen.add(job_state(job))
            time.sleep(0.2)
        fail_to_requeue = time.time() - t_fail
        assert seen & {"NODE_FAIL", "PENDING", "REQUEUED"}, seen
        assert node_states()["node2"].rstrip("*") == "down"
    finally:
        slurm_local("node-up", "2")
    wait_done(job)
    starts = batch_times(run)
    assert len(starts) == 2, slurm_log(run)[-3000:]
    # Slurm's own account of it: a node failure, and the requeue that follows from it.
    controller = (CONF.parent / "slurmctld.log").read_text()
    assert f"requeue job JobId={job} due to failure of node node2" in controller, controller[-3000:]
    assert re.search(r"resuming \S+/step00000004 at step", slurm_log(run)), slurm_log(run)[-3000:]
    assert_every_step_once_like(run, straight[0], None)
    assert_crash_replay_in_mlflow(server, run, straight[0])
    print(f"\n[two nodes] node2 failure: fail-to-requeue {fail_to_requeue:.1f}s, fail-to-restart "
          f"{starts[1] - t_fail:.1f}s")


def test_a_job_on_1_to_2_nodes_continues_on_node1_alone_when_node2_stays_down(
        straight, server: Server, tmp_path: Path, tokenizer_dir: Path, sample_dataset: str) -> None:
    run = tmp_path / "shrunk"
    job, _ = submit(run, tokenizer_dir, sample_dataset, server, *STALL, nodes="1-2")
    wait_stalled(run)
    t_fail = time.time()
    try:
        slurm_local("node-down", "2")
        wait_done(job, timeout=400)
    finally:
        slurm_local("node-up", "2")
    log = slurm_log(run)
    assert "4 processes = tensor 2 x data 2" in log, log[-3000:]
    assert "resharding TP2 x DP2 ZeRO-1 -> TP2 x DP1 ZeRO-1" in log, log[-3000:]
    assert "2 processes = tensor 2 x data 1" in log, log[-3000:]
    assert re.search(r"resuming \S+/step00000004 at step", log), log[-3000:]
    assert re.findall(r"\[batch\] job \d+ \(restart \d+\) on (\S+) at", log) == ["node[1-2]", "node1"], log[-3000:]
    # DP=1 accumulates four micro-batches where each DP=2 rank had two and the ranks reduced them
    # across the nodes: equal up to rounding.
    assert_every_step_once_like(run, straight[0], None, rel=1e-5)
    assert_crash_replay_in_mlflow(server, run, straight[0], rel=1e-5)
    print(f"\n[two nodes] --nodes 1-2, node2 down: fail-to-restart on node1 {batch_times(run)[1] - t_fail:.1f}s")


def test_stop_leaves_no_namespace_link_hosts_entry_or_daemon(nodes) -> None:
    """Stops every local cluster and checks; starts again what was running before (CI's)."""
    one_node_was_up = SLURM_DIR.joinpath("slurmctld.pid").is_file()
    slurm_local("stop")
    try:
        netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
        assert "mlra-node" not in netns and "mlra-br0" not in links and "mlra-veth" not in links
        assert "mlra-slurm-local" not in Path("/etc/hosts").read_text()
        daemons = subprocess.run(["pgrep", "-a", "-f", "^(tini -s -- )?(slurmd|slurmctld|munged|slurmstepd)"],
                                 capture_output=True, text=True).stdout
        assert not daemons, daemons
    finally:
        if one_node_was_up:
            slurm_local("start")
        slurm_local("start", "--nodes", "2")
