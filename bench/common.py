"""What every benchmark script shares: the machine record, median and spread, the table, the
JSON file, the benchmark models and their data, and launching measured workers.

Benchmarks measure contestants side by side in one run: rounds of repetitions, each round running
every contestant once in a fresh process (the same thread count for each), so a slow spell of the
machine hits all of them. A contestant's number is the median over rounds of its per-round median
step time; the spread is the range of the per-round medians.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
DATA = RESULTS / "data"
WORKER = REPO / "bench" / "trainer_worker.py"

# The benchmark models, as config overrides of configs/quickstart.yaml (d 64, 2 layers, seq 64,
# batch 8 in micro-batches of 4). "mid" has d_head 64 like GPT-2; "gpt2-small-4l" is GPT-2 small's
# width and vocabulary with 4 layers (the TEV issue's reference size).
MODELS: dict[str, list[str]] = {
    "quickstart": [],
    "mid": ["model.num_layers=4", "model.hidden_size=256", "model.num_heads=4", "model.seq_length=128"],
    "gpt2-small-4l": ["model.num_layers=4", "model.hidden_size=768", "model.num_heads=12", "model.seq_length=256",
                      "model.vocab_multiple=128", "train.global_batch_size=2", "train.micro_batch_size=1"],
}
GPT2_VOCAB = 50257


def machine() -> dict[str, Any]:
    """Host, CPU, memory, accelerator and the versions that decide the numbers."""
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gib = None
    try:
        mem_gib = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError):
        pass
    versions = {}
    for dist in ("torch", "megatron-core", "deepspeed", "transformers", "sentencepiece", "mlra-mega"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = None
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"host": socket.gethostname(), "cpu": cpu, "logical_cpus": os.cpu_count(),
            "affinity_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
            "memory_gib": mem_gib, "gpu": gpu, "python": platform.python_version(), "versions": versions,
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def spread(values: Sequence[float]) -> dict[str, float]:
    """Median, range and relative range (percent of the median) of repeated measurements."""
    values = sorted(values)
    med = statistics.median(values)
    return {"median": med, "min": values[0], "max": values[-1], "n": len(values),
            "range_pct": 100.0 * (values[-1] - values[0]) / med if med else 0.0}


def median_interval(values: Sequence[float], confidence: float = 0.9) -> dict[str, float]:
    """A distribution-free interval for the median of repeated measurements: the k-th smallest
    and k-th largest value, with k the largest such that the median lies between them with at
    least `confidence` (binomial order statistics); with too few values, the whole range and its
    actual coverage (1 - 2 / 2^n)."""
    import math

    xs = sorted(values)
    n = len(xs)

    def coverage(k: int) -> float:  # P(x_(k) <= median <= x_(n+1-k))
        return 1.0 - 2.0 * sum(math.comb(n, i) for i in range(k)) / 2.0**n

    k = 1
    while k + 1 <= n // 2 and coverage(k + 1) >= confidence:
        k += 1
    return {"median": statistics.median(xs), "low": xs[k - 1], "high": xs[n - k], "coverage": coverage(k)}


def steady(times: Sequence[float], warmup: int) -> float:
    """Median of one repetition's step times after its warm-up steps."""
    if len(times) <= warmup:
        raise ValueError(f"{len(times)} step times, {warmup} of them warm-up: run more steps")
    return statistics.median(times[warmup:])


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]], title: str = "") -> str:
    """A plain aligned text table; numbers right-aligned."""
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    lines = [title] if title else []
    lines.append("  ".join(h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(headers, widths))))
    lines.append("  ".join("-" * w for w in widths))
    for r in cells:
        lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))
    return "\n".join(lines)


def _cell(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:,.4g}" if abs(v) < 1000 else f"{v:,.0f}"
    return str(v)


def write_json(path: str | Path, payload: dict[str, Any]) -> Path:
    """`payload` with the machine and the command line, to `path` (folders made)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]), "machine": machine(), **payload}
    path.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {path}")
    return path


def sample_data(root: Path = DATA) -> tuple[Path, Path]:
    """(tokenizer dir, dataset prefix) of the quickstart's sample corpus, made once."""
    from mlra_mega.quickstart import prepare_sample_data

    return prepare_sample_data(root / "sample", log=lambda s: None)


def gpt2_vocab_data(root: Path = DATA) -> tuple[Path, Path]:
    """(tokenizer dir, dataset prefix) with GPT-2's vocabulary size (50257): the python3.11-doc
    corpus of the depth study (the sample corpus is too small for 50k pieces), made once."""
    from mlra_mega.data.datasets import check_dataset_cards
    from mlra_mega.data.preprocess import Progress, preprocess
    from mlra_mega.data.tokenizer import load_tokenizer, train_tokenizer
    from mlra_mega.errors import DataError

    base = root / "gpt2-vocab"
    corpus, tok_dir, prefix = base / "corpus.jsonl", base / "tokenizer", base / "docs"
    base.mkdir(parents=True, exist_ok=True)
    if not corpus.is_file():
        subprocess.run([sys.executable, str(REPO / "scripts" / "paper_corpus.py"), str(corpus)], check=True)
    try:
        tokenizer = load_tokenizer(tok_dir)
    except DataError:
        train_tokenizer([corpus], GPT2_VOCAB, tok_dir, log=print)
        tokenizer = load_tokenizer(tok_dir)
    try:
        check_dataset_cards([str(prefix)], tokenizer)
    except DataError:
        preprocess([corpus], tok_dir, prefix, overwrite=True, progress=Progress(None, interactive=False, log=print))
    return tok_dir, prefix


def model_overrides(model: str) -> list[str]:
    """Config overrides (model shape and its data) for one of MODELS."""
    if model not in MODELS:
        raise SystemExit(f"error: --model {model!r} is not one of {', '.join(MODELS)}")
    tok, prefix = gpt2_vocab_data() if model == "gpt2-small-4l" else sample_data()
    return [*MODELS[model], f"data.tokenizer={tok}", f"data.paths=[{prefix}]"]


def run_worker(script: Path, nproc: int, args: Sequence[str], out: Path, timeout_s: float = 1800) -> dict[str, Any]:
    """Runs `script --worker ... --result out` (under torchrun when nproc > 1) with the machine's
    cores split evenly over the processes; returns the JSON it wrote."""
    threads = max(1, (os.cpu_count() or 1) // nproc)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONPATH=str(REPO))
    launcher = [sys.executable] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    out.unlink(missing_ok=True)
    start = time.monotonic()
    proc = subprocess.run([*launcher, str(script), *args, "--result", str(out)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout_s)
    if proc.returncode or not out.is_file():
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-6000:])
        raise SystemExit(f"error: worker {script.name} {' '.join(args)} failed (exit {proc.returncode})")
    result = json.loads(out.read_text())
    result["wall_s"] = time.monotonic() - start
    return result


class StepClock:
    """Wall time between consecutive step ends: the whole loop, data and callbacks included.

    With `profile=(first, count)` torch's profiler records the steps first+1 .. first+count (from
    the end of step `first` to the end of step first+count) on every thread; `operators()` then
    gives its per-step operator table (self CPU time)."""

    def __init__(self, profile: tuple[int, int] | None = None) -> None:
        self.last: float | None = None
        self.times: list[float] = []
        self.profile = profile
        self._prof: Any = None
        self.profiled: list[dict[str, Any]] | None = None

    def tick(self) -> None:
        now = time.perf_counter()
        if self.last is not None:
            self.times.append(now - self.last)
        self.last = now
        if self.profile is not None:
            self._profile_tick(len(self.times) + 1)  # steps ended so far
            self.last = time.perf_counter()  # the profiler's own start and stop are not a step's time

    def _profile_tick(self, ended: int) -> None:
        import torch

        first, count = self.profile
        if ended == first:
            self._prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
            self._prof.start()
        elif ended == first + count and self._prof is not None:
            self._prof.stop()
            self.profiled = operator_rows(self._prof, count)
            self._prof = None


def operator_rows(prof: Any, steps: int, top: int = 40) -> list[dict[str, Any]]:
    """The profiler's operators by self CPU time, per step: name, ms per step, calls per step."""
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events) or 1.0
    return [{"op": e.key, "self_ms_per_step": e.self_cpu_time_total / 1e3 / steps,
             "calls_per_step": e.count / steps, "share": e.self_cpu_time_total / total} for e in events[:top]]


def measure(contestants: dict[str, tuple[int, list[str]]], rounds: int, warmup: int, work: Path,
            script: Path = WORKER, tag: str = "bench") -> dict[str, dict[str, Any]]:
    """Each contestant (name -> (processes, worker arguments)) once per round, rounds interleaved;
    per contestant: the spread of its per-round median step times and the last run's result."""
    out: dict[str, dict[str, Any]] = {name: {"per_round_s": []} for name in contestants}
    for r in range(rounds):
        for name, (nproc, args) in contestants.items():
            res = run_worker(script, nproc, args, work / f"{tag}-{len(out)}-{name.replace(' ', '_')}.json")
            out[name]["per_round_s"].append(steady(res["step_times_s"], warmup))
            out[name]["last"] = res
            print(f"[{tag}] round {r + 1}/{rounds} {name}: {1e3 * out[name]['per_round_s'][-1]:.2f} ms/step",
                  flush=True)
    for entry in out.values():
        entry["step_s"] = spread(entry["per_round_s"])
    return out


def arguments(doc: str, name: str, *, steps: int, warmup: int, rounds: int = 3,
              model: str | None = "mid") -> argparse.ArgumentParser:
    """The options every trainer benchmark takes (--model, --rounds, --steps, --warmup, --out)."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    if model is not None:
        ap.add_argument("--model", default=model, choices=list(MODELS))
    ap.add_argument("--rounds", type=int, default=rounds)
    ap.add_argument("--steps", type=int, default=steps)
    ap.add_argument("--warmup", type=int, default=warmup, help="steps of each run left out of the statistics")
    ap.add_argument("--out", default=str(RESULTS / f"{name}.json"))
    return ap


def record(results: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """What the JSON keeps of `measure`'s results: the statistics and the last run's sizes."""
    return {name: {"step_s": r["step_s"], "per_round_s": r["per_round_s"], "parameters": r["last"].get("parameters"),
                   "ranks": r["last"].get("ranks")} for name, r in results.items()}
