"""`mlra-mega submit`: render the sbatch template for a run and hand it to sbatch.

The batch script, not the trainer, knows Slurm: it sets the rendezvous (first host of the
allocation), starts one srun task per rank, and requeues the job when the trainer leaves a
PREEMPTED marker in the run directory. `submit` fixes run.dir in the script, so a requeued job
resumes the same run (and the same MLflow run). sbatch is called with an argument list; no shell
string is built from user input: values on `#SBATCH` lines (job name, time, partition, account,
the output path) must match a strict character set, everything on command lines is shell-quoted,
and credentials in tracking.uri leave the script for MLflow's variables in sbatch's environment.
"""

from __future__ import annotations

import datetime
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from mlra_mega.config import ConfigError, load_config
from mlra_mega.credentials import split_credentials

__all__ = ["SubmitOptions", "render", "submit", "TEMPLATE"]

TEMPLATE = Path(__file__).resolve().parent.parent / "slurm" / "train.sbatch.in"
ENTRY = Path(__file__).resolve().parent.parent / "launchers" / "train.py"  # also torchrun's and deepspeed's


@dataclass
class SubmitOptions:
    config: str
    overrides: list[str] = field(default_factory=list)
    nodes: int | str = 1  # a count, or MIN-MAX (a requeued job may then start on fewer nodes)
    gpus_per_node: int = 8
    tasks_per_node: int | None = None  # None: gpus_per_node (GPU) or 1 (--cpu)
    cpus_per_task: int | None = None  # None: 8 (GPU), or what the partition's nodes have (--cpu)
    partition: str | None = None
    account: str | None = None
    time: str = "24:00:00"
    signal_lead_s: int = 300
    cpu: bool = False
    job_name: str = "mlra-mega"
    python: str = sys.executable


# What an `#SBATCH` line may hold: Slurm reads these lines itself, and a newline in one would
# start a shell line of the script.
_SBATCH_VALUES = {
    "job_name": (re.compile(r"[A-Za-z0-9._+\-]{1,128}"), "letters, digits and . _ + - (at most 128)"),
    "time": (re.compile(r"(\d+-)?\d+(:\d{1,2}){0,2}|UNLIMITED|INFINITE|unlimited|infinite"),
             "a Slurm time such as 24:00:00, 1-00:00:00 or 90"),
    "partition": (re.compile(r"[A-Za-z0-9._\-]{1,128}(,[A-Za-z0-9._\-]{1,128})*"), "a partition name (letters, digits, . _ -)"),
    "account": (re.compile(r"[A-Za-z0-9._\-]{1,128}"), "an account name (letters, digits, . _ -)"),
}
_PATH = re.compile(r"[A-Za-z0-9._+\-/@%=,:~]+")


def _check_sbatch_value(name: str, value: str | None) -> None:
    if value is None:
        return
    pattern, what = _SBATCH_VALUES[name]
    if not pattern.fullmatch(value):
        shown = repr(value) if len(value) <= 60 else repr(value[:60]) + "..."
        raise ConfigError(f"--{name.replace('_', '-')}", f"{shown} is not {what}",
                          "give a plain value: it is written into the batch script")


def _run_dir(cfg) -> str:
    if cfg.run.dir:
        return str(Path(cfg.run.dir).resolve())
    name = cfg.run.name or datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    return str((Path(cfg.run.root) / cfg.tracking.experiment / name).resolve())


def _job_overrides(opts: SubmitOptions, cfg, run_dir: str) -> tuple[list[str], dict[str, str]]:
    """The overrides the job runs with (run.dir fixed, tracking.uri without credentials) and the
    MLflow variables that carry the credentials."""
    keep = [o for o in opts.overrides if not o.startswith(("run.dir=", "tracking.uri="))]
    env: dict[str, str] = {}
    if cfg.tracking.uri:
        clean, env = split_credentials(cfg.tracking.uri)
        if env or any(o.startswith("tracking.uri=") for o in opts.overrides):
            keep.append(f"tracking.uri={clean}")
    return [*keep, f"run.dir={run_dir}"], env


GPU_CPUS_PER_TASK = 8


def node_cpus(partition: str | None) -> int | None:
    """The fewest CPUs a node of the partition (default: every node) has, as Slurm reports it;
    None where sinfo is absent or says nothing."""
    if shutil.which("sinfo") is None:
        return None
    cmd = ["sinfo", "-h", "-N", "-o", "%c", *(["-p", partition] if partition else [])]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    counts = [int(x) for x in out.split() if x.isdigit()]
    return min(counts) if counts else None


def cpus_per_task(opts: SubmitOptions, tasks: int, cpus_on_node: int | None) -> int:
    """--cpus-per-task, or its default: 8 with GPUs; with --cpu the node's CPUs shared by its
    tasks (a CPU node often has fewer than 8, and Slurm refuses a job asking for more)."""
    if opts.cpus_per_task is not None:
        wanted = opts.cpus_per_task
        if opts.cpu and cpus_on_node is not None and wanted * tasks > cpus_on_node:
            raise ConfigError("--cpus-per-task", f"{wanted} x {tasks} task(s) per node is more than the "
                              f"{cpus_on_node} CPUs a node{' of ' + opts.partition if opts.partition else ''} has",
                              f"give --cpus-per-task {max(1, cpus_on_node // tasks)} or fewer, or fewer "
                              "--tasks-per-node")
        return wanted
    if not opts.cpu:
        return GPU_CPUS_PER_TASK
    return max(1, (cpus_on_node or tasks) // tasks)


_NODES = re.compile(r"([1-9]\d*)(?:-([1-9]\d*))?")


def _nodes(value: int | str) -> str:
    """--nodes as written on the #SBATCH line: N, or MIN-MAX with MIN <= MAX."""
    m = _NODES.fullmatch(str(value).strip())
    if m is None or (m.group(2) is not None and int(m.group(2)) < int(m.group(1))):
        raise ConfigError("--nodes", f"{str(value)[:40]!r} is not a node count",
                          "give a count such as 2, or MIN-MAX such as 1-2 (MIN <= MAX)")
    return m.group(0)


def render(opts: SubmitOptions, cpus_on_node: int | None = None) -> str:
    """The batch script for these options."""
    if not TEMPLATE.is_file() or not ENTRY.is_file():
        raise ConfigError("submit", f"{TEMPLATE} or {ENTRY} not found",
                          "run from a source checkout (pip install -e .), where slurm/ and launchers/ sit")
    nodes = _nodes(opts.nodes)
    for name in ("gpus_per_node", "cpus_per_task", "signal_lead_s"):
        if getattr(opts, name) is not None and getattr(opts, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')}", f"must be >= 1, got {getattr(opts, name)}",
                              "give a positive number")
    for name in _SBATCH_VALUES:
        _check_sbatch_value(name, getattr(opts, name))
    tasks = opts.tasks_per_node or (1 if opts.cpu else opts.gpus_per_node)
    cpus = cpus_per_task(opts, tasks, cpus_on_node)
    cfg = load_config(opts.config, opts.overrides)  # validated here, at submission, once
    tp = cfg.parallel.tensor
    if tasks % tp:
        # megatron puts consecutive ranks in a TP group: with TP not dividing a node's tasks, a
        # group would straddle two nodes and its all-reduces of every layer would cross the network.
        raise ConfigError("parallel.tensor", f"{tp} does not divide the {tasks} task(s) per node: tensor "
                          "parallelism stays within a node", f"give --tasks-per-node a multiple of {tp}, or a "
                          f"parallel.tensor dividing {tasks}")
    run_dir = _run_dir(cfg)
    if not _PATH.fullmatch(run_dir):
        raise ConfigError("run.dir", f"{run_dir!r} holds a space, a newline or a shell character, and is written "
                          "into the batch script's #SBATCH --output line", "use a run directory of letters, digits "
                          "and . _ - / only (run.dir, run.root, run.name, tracking.experiment)")
    overrides, _ = _job_overrides(opts, cfg, run_dir)
    command = " ".join(shlex.quote(x) for x in [opts.python, str(ENTRY), str(Path(opts.config).resolve()),
                                                *overrides])
    resources = ""
    if not opts.cpu:
        resources += f"#SBATCH --gpus-per-node={opts.gpus_per_node}\n"
    if opts.partition:
        resources += f"#SBATCH --partition={opts.partition}\n"
    if opts.account:
        resources += f"#SBATCH --account={opts.account}\n"
    env = "export CUDA_VISIBLE_DEVICES=\n" if opts.cpu else ""
    if "-" in nodes:
        # Slurm rewrites a started job's task count to what it got (4 tasks on 2 nodes) and keeps
        # it on requeue, so a MIN-MAX job asking for tasks per node would wait for its first node
        # count forever. Whole nodes, with the tasks laid out by srun, leave the range open.
        task_lines, srun_tasks = "#SBATCH --exclusive\n", f"--ntasks-per-node={tasks} --cpus-per-task={cpus} "
    else:
        task_lines, srun_tasks = f"#SBATCH --ntasks-per-node={tasks}\n#SBATCH --cpus-per-task={cpus}\n", ""
    return TEMPLATE.read_text().format(
        job_name=opts.job_name, nodes=nodes, task_lines=task_lines, srun_tasks=srun_tasks,
        resource_lines=resources, time=opts.time, signal_lead=opts.signal_lead_s, run_dir=run_dir,
        run_dir_q=shlex.quote(run_dir), omp_threads=cpus, env_lines=env, command=command)


def submit(opts: SubmitOptions, dry_run: bool = False) -> str:
    """Prints the script (dry run) or submits it; returns the script or the job id."""
    _check_sbatch_value("partition", opts.partition)  # before sinfo is asked about it
    script = render(opts, node_cpus(opts.partition) if opts.cpu else None)
    if dry_run:
        return script
    if shutil.which("sbatch") is None:
        raise ConfigError("submit", "sbatch is not on PATH", "run on a Slurm login node, or use --dry-run")
    run_dir = Path(script.split("RUN_DIR=", 1)[1].splitlines()[0].strip("'"))
    run_dir.mkdir(parents=True, exist_ok=True)
    fd, path = tempfile.mkstemp(prefix="mlra-mega-", suffix=".sbatch", dir=run_dir)
    with os.fdopen(fd, "w") as f:
        f.write(script)
    cfg = load_config(opts.config, opts.overrides)
    _, credentials = _job_overrides(opts, cfg, str(run_dir))
    # sbatch hands its environment to the job (--export=ALL), so the secret never sits in the script.
    proc = subprocess.run(["sbatch", "--parsable", path], capture_output=True, text=True,
                          env={**os.environ, **credentials})
    if proc.returncode != 0:
        raise ConfigError("submit", f"sbatch refused the job: {proc.stderr.strip() or proc.stdout.strip()}",
                          "check --partition, --account, --time and the resources asked for")
    return proc.stdout.strip().split(";")[0]
