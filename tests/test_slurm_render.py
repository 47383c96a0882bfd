"""The batch script `mlra-mega submit` renders, without a cluster: CPU defaults that fit the node,
and a batch shell that forwards the signals it is sent to the tasks (bash's default for USR1
would end it, and nothing would requeue)."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from mlra_mega.config import ConfigError
from mlra_mega.slurm import SubmitOptions, cpus_per_task, render

QUICKSTART = str(Path(__file__).resolve().parent.parent / "configs" / "quickstart.yaml")


def test_cpu_jobs_ask_for_the_cpus_a_node_has() -> None:
    gpu = SubmitOptions(config=QUICKSTART)
    assert cpus_per_task(gpu, 8, None) == 8  # GPU nodes: 8 per task, as before
    cpu = SubmitOptions(config=QUICKSTART, cpu=True)
    assert cpus_per_task(cpu, 1, 2) == 2 and cpus_per_task(cpu, 2, 2) == 1 and cpus_per_task(cpu, 4, 2) == 1
    assert cpus_per_task(cpu, 2, None) == 1  # Slurm said nothing: one CPU per task always fits
    with pytest.raises(ConfigError, match=r"--cpus-per-task: 8 x 1 task\(s\) per node is more than the 2 CPUs"):
        cpus_per_task(SubmitOptions(config=QUICKSTART, cpu=True, cpus_per_task=8), 1, 2)
    script = render(SubmitOptions(config=QUICKSTART, cpu=True, tasks_per_node=1), cpus_on_node=2)
    assert "#SBATCH --cpus-per-task=2\n" in script and "export OMP_NUM_THREADS=2\n" in script


def _batch_shell(tmp_path: Path) -> tuple[Path, str]:
    """The rendered script with `srun` and `scancel` replaced by stand-ins that log what they got."""
    script = render(SubmitOptions(config=QUICKSTART, cpu=True, tasks_per_node=1, cpus_per_task=1),
                    cpus_on_node=2)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "calls.log"
    # srun: a task that runs until it is signalled through scancel (the stand-in kills it with the
    # signal scancel was asked to send), writing PREEMPTED as the trainer would.
    (bin_dir / "srun").write_text(f"""#!/bin/bash
echo $$ > {tmp_path}/task.pid
trap 'echo "{{\\"signal\\": \\"USR1\\"}}" > "$RUN_DIR/PREEMPTED"; exit 0' USR1
trap 'echo "{{\\"signal\\": \\"TERM\\"}}" > "$RUN_DIR/PREEMPTED"; exit 0' TERM
while true; do sleep 0.05; done
""")
    (bin_dir / "scancel").write_text(f"""#!/bin/bash
echo "scancel $*" >> {log}
sig=${{1#--signal=}}
kill -s "$sig" "$(cat {tmp_path}/task.pid)"
""")
    (bin_dir / "scontrol").write_text(f"""#!/bin/bash
if [ "$1" = show ]; then echo localhost; else echo "scontrol $*" >> {log}; fi
""")
    for tool in ("srun", "scancel", "scontrol"):
        (bin_dir / tool).chmod(0o755)
    path = tmp_path / "job.sbatch"
    path.write_text(script)
    return path, str(bin_dir)


@pytest.mark.parametrize("sig", ["USR1", "TERM"])
def test_a_signal_to_the_batch_shell_reaches_the_tasks_and_the_job_requeues(sig: str, tmp_path: Path) -> None:
    """USR1 (`scancel --signal=USR1 --batch`, `--signal=B:USR1@300`) or SIGTERM (what Slurm sends
    the batch shell at preemption or time-out) is forwarded to the tasks and the job requeued."""
    path, bin_dir = _batch_shell(tmp_path)
    run_dir = Path(path.read_text().split("RUN_DIR=", 1)[1].splitlines()[0].strip("'"))
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_JOB_ID="77",
               SLURM_JOB_NODELIST="localhost", RUN_DIR=str(run_dir))
    shell = subprocess.Popen(["bash", str(path)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 30
    while not (tmp_path / "task.pid").is_file():  # the task is up: a state, not a sleep
        assert time.monotonic() < deadline and shell.poll() is None, shell.stdout.read()
        time.sleep(0.02)
    shell.send_signal(getattr(signal, f"SIG{sig}"))
    out, _ = shell.communicate(timeout=30)
    calls = (tmp_path / "calls.log").read_text().splitlines()
    assert shell.returncode == 0, out
    assert calls == [f"scancel --signal={sig} 77", "scontrol requeue 77"], (calls, out)
    assert f"{sig} at" in out and "forwarded to the tasks" in out and "requeueing" in out


def test_tensor_parallelism_stays_within_a_node_and_nodes_may_be_a_range() -> None:
    opts = dict(config=QUICKSTART, cpu=True, cpus_per_task=1)
    with pytest.raises(ConfigError, match=r"parallel.tensor: 2 does not divide the 1 task\(s\) per node"):
        render(SubmitOptions(**opts, tasks_per_node=1, overrides=["parallel.tensor=2"]), cpus_on_node=2)
    with pytest.raises(ConfigError, match=r"parallel.tensor: 2 does not divide the 3 task\(s\) per node"):
        render(SubmitOptions(**opts, tasks_per_node=3, overrides=["parallel.tensor=2"]), cpus_on_node=4)
    script = render(SubmitOptions(**opts, tasks_per_node=2, nodes="1-2", overrides=["parallel.tensor=2"]),
                    cpus_on_node=2)
    assert "#SBATCH --nodes=1-2\n" in script
    # A range: whole nodes, tasks laid out by srun (a requeued job can then start on fewer nodes).
    assert "#SBATCH --exclusive\n" in script and "#SBATCH --ntasks-per-node" not in script
    assert "srun --kill-on-bad-exit=1 --ntasks-per-node=2 --cpus-per-task=1 " in script
    fixed = render(SubmitOptions(**opts, tasks_per_node=2, nodes="2", overrides=["parallel.tensor=2"]), cpus_on_node=2)
    assert "#SBATCH --ntasks-per-node=2\n#SBATCH --cpus-per-task=1\n" in fixed and "--exclusive" not in fixed
    for bad in ("0", "2-1", "1-", "two", "1-2\ntouch F"):
        with pytest.raises(ConfigError, match="--nodes: .* is not a node count"):
            render(SubmitOptions(**opts, tasks_per_node=1, nodes=bad), cpus_on_node=2)
