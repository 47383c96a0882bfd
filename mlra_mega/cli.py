"""`mlra-mega`: the command line. Errors a user can cause print one line and exit with 2.

Commands: `quickstart` (the main job on embedded defaults), `train` (any config, any launcher),
`export-hf` (a checkpoint to Hugging Face), `reshard` (a checkpoint to another TP x PP),
`generate` (continue a prompt from a checkpoint or an export), `evaluate` (perplexity of a text
file, or lm-eval tasks, from a checkpoint or an export),
`tokenizer train` and `preprocess` (the data
pipeline), `config` (load, validate and print a resolved configuration).
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from mlra_mega.errors import MlraMegaError

__all__ = ["main", "build_parser", "one_line"]



def _exists(path: str) -> bool:
    try:
        return Path(path).exists()
    except OSError:  # a name too long to be a file: an override, not a path
        return False


def _cmd_config(args: argparse.Namespace) -> int:
    import yaml

    from mlra_mega.config import load_config, public_dict

    if args.keys:
        from mlra_mega.config import describe_keys

        rows = [(key, kind, "null" if default is None else str(list(default) if isinstance(default, tuple) else default),
                 text) for key, kind, default, text in describe_keys()]
        widths = [max(len(r[i]) for r in rows) for i in range(3)]
        for row in rows:
            print("  ".join(cell.ljust(w) for cell, w in zip(row[:3], widths)) + "  " + row[3])
        return 0
    path, overrides = args.config, list(args.overrides)
    if path is not None and "=" in path and not _exists(path):
        path, overrides = None, [path, *overrides]  # `mlra-mega config a.b=1`: no file given
    cfg = load_config(path, overrides)
    print(yaml.safe_dump(public_dict(cfg), sort_keys=False), end="")
    return 0


def _cmd_quickstart(args: argparse.Namespace) -> int:
    import math

    from mlra_mega.quickstart import quickstart_config
    from mlra_mega.train.run import train

    def log(line: str) -> None:
        print(line, flush=True)

    cfg = quickstart_config(args.overrides, log=log)
    log(f"[quickstart] {cfg.model.num_layers}-layer {cfg.model.attention} GPT in {cfg.model.arch} blocks, "
        f"hidden {cfg.model.hidden_size}, "
        f"{cfg.train.steps} steps on the sample corpus")
    history, run_dir = train(cfg, log=log)
    first, last = history[0], history[-1]
    tev = next((m for m in reversed(history) if m.tev_mean is not None), None)
    tev_text = f", TEV {tev.tev_mean:.5f} +- {tev.tev_std:.5f}" if tev else ""
    log(f"[quickstart] final loss {last.loss:.4f} (first {first.loss:.4f}), perplexity {math.exp(last.loss):.2f}"
        f"{tev_text}, {sum(m.step_time_s for m in history):.1f}s; run dir {run_dir}")
    if cfg.tracking.enabled:
        from mlra_mega.tracking.mlflow import tracking_uri, ui_command

        log(f"[quickstart] look at it in MLflow: {ui_command(tracking_uri(cfg))}")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from mlra_mega.config import load_config
    from mlra_mega.train.run import train

    overrides = list(args.overrides)
    if args.resume is not None:
        overrides.append(f"checkpoint.resume={args.resume}")
    cfg = load_config(args.config, overrides)
    history, run_dir = train(cfg)
    from mlra_mega.distributed import launch_env

    if history and launch_env().rank == 0:
        last = history[-1]
        how = "stopped (preempted)" if (run_dir / "PREEMPTED").exists() else "done"
        print(f"[train] {how}: step {last.step}, loss {last.loss:.4f}; metrics in {run_dir / 'metrics.jsonl'}")
    return 0


def _cmd_sweep(args: argparse.Namespace) -> int:
    from mlra_mega.sweep import load_spec, run_sweep

    submit = None
    if args.submit:
        from mlra_mega.slurm import SubmitOptions
        from mlra_mega.slurm import submit as sbatch

        def submit(member_yaml: Path) -> str:
            opts = SubmitOptions(config=str(member_yaml), nodes=args.nodes, gpus_per_node=args.gpus_per_node,
                                 tasks_per_node=args.tasks_per_node, cpus_per_task=args.cpus_per_task,
                                 partition=args.partition, account=args.account, time=args.time, cpu=args.cpu,
                                 job_name=f"mlra-{member_yaml.parent.name}")
            out = sbatch(opts, dry_run=args.dry_run)
            return "dry run: script printed above" if args.dry_run and print(out) is None else f"submitted job {out}"

    outcomes = run_sweep(load_spec(args.spec, args.seeds, args.overrides), submit=submit)
    print(f"[sweep] {len(outcomes)} members: " + ", ".join(f"{name} {what}" for name, what in outcomes))
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from mlra_mega.report import build_report

    build_report(args.target, args.tracking_uri, Path(args.out or f"reports/{args.target}"))
    return 0


def _cmd_stacks(args: argparse.Namespace) -> int:
    from mlra_mega.errors import ConfigError
    from mlra_mega.train.rank_logs import request_stacks

    results = request_stacks(Path(args.run_dir))
    if not results:
        raise ConfigError("RUN_DIR", f"{args.run_dir} has no logs/rank*.json",
                          "give the run directory of a job that is running (its logs/ lists the ranks)")
    for rank, outcome in results:
        print(f"rank {rank}: {outcome}")
    return 0


def _cmd_sync_tracking(args: argparse.Namespace) -> int:
    from mlra_mega.tracking.mlflow import sync_run

    sent = sync_run(Path(args.run_dir), args.tracking_uri)
    print(f"[mlflow] sent {sent} points the tracking store did not have")
    return 0


def _cmd_export_hf(args: argparse.Namespace) -> int:
    from mlra_mega.export import export_hf

    export_hf(args.checkpoint, args.output)
    return 0


def _cmd_generate(args: argparse.Namespace) -> int:
    from mlra_mega.errors import ConfigError
    from mlra_mega.generate import SamplingOptions, run

    if (args.prompt is None) == (args.prompt_file is None):
        raise ConfigError("--prompt", "give a prompt, or --prompt-file, and not both",
                          "add --prompt TEXT, or --prompt-file FILE (one prompt a line)")
    if args.prompt_file is not None:
        try:
            prompts = [line for line in Path(args.prompt_file).read_text().splitlines() if line.strip()]
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError("--prompt-file", f"cannot read {args.prompt_file} ({exc.__class__.__name__})",
                              "give a UTF-8 text file, one prompt a line") from None
        if not prompts:
            raise ConfigError("--prompt-file", f"{args.prompt_file} holds no prompt", "write one prompt a line")
    else:
        prompts = [args.prompt]
    run(args.source, prompts, SamplingOptions(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                              top_k=args.top_k, top_p=args.top_p, seed=args.seed))
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from mlra_mega.errors import ConfigError

    if (args.text is None) == (args.tasks is None):
        raise ConfigError("--text", "give --text FILE or --tasks NAMES, and not both",
                          "add --text FILE for a perplexity, or --tasks A,B for lm-eval tasks")
    if args.text is not None:
        if args.include_path is not None or args.limit is not None or args.output is not None:
            raise ConfigError("--include-path", "--include-path, --limit and --output go with --tasks",
                              "leave them out with --text")
        from mlra_mega.evaluate import evaluate_text

        evaluate_text(args.source, args.text, args.stride)
        return 0
    if args.stride is not None:
        raise ConfigError("--stride", "goes with --text", "leave it out with --tasks")
    if args.limit is not None and args.limit < 1:
        raise ConfigError("--limit", f"must be >= 1, got {args.limit}", "give a number of documents per task")
    from mlra_mega.evaluate import evaluate_tasks

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    evaluate_tasks(args.source, tasks, args.include_path, args.output, args.limit, track=not args.no_track)
    return 0


def _cmd_reshard(args: argparse.Namespace) -> int:
    from mlra_mega import distributed
    from mlra_mega.config import ConfigError, ParallelConfig
    from mlra_mega.train.reshard import reshard

    layers = None
    if args.pipeline_layers:
        try:
            layers = [int(x) for x in args.pipeline_layers.split(",")]
        except ValueError:
            raise ConfigError("--pipeline-layers", f"{args.pipeline_layers!r} is not two whole numbers",
                              "write FIRST,LAST, e.g. --pipeline-layers 5,7") from None
    distributed.setup(ParallelConfig(tensor=1), seed=0)  # the checkpoint reader builds nothing, but loads DeepSpeed
    try:
        reshard(args.checkpoint, args.output, args.tensor, args.pipeline, layers)
    finally:
        distributed.teardown()
    return 0


def _cmd_submit(args: argparse.Namespace) -> int:
    from mlra_mega.slurm import SubmitOptions, submit

    opts = SubmitOptions(config=args.config, overrides=list(args.overrides), nodes=args.nodes,
                         gpus_per_node=args.gpus_per_node, tasks_per_node=args.tasks_per_node,
                         cpus_per_task=args.cpus_per_task, partition=args.partition, account=args.account,
                         time=args.time, signal_lead_s=args.signal_lead, cpu=args.cpu, job_name=args.job_name)
    out = submit(opts, dry_run=args.dry_run)
    print(out if args.dry_run else f"submitted job {out}")
    return 0


def _cmd_tokenizer_train(args: argparse.Namespace) -> int:
    from mlra_mega.data.tokenizer import train_tokenizer

    train_tokenizer(args.input, args.vocab_size, args.output, model_type=args.model_type, seed=args.seed,
                    max_training_bytes=args.max_training_bytes, max_sentence_length=args.max_sentence_length,
                    json_key=args.json_key, threads=args.threads)
    return 0


def _cmd_preprocess(args: argparse.Namespace) -> int:
    from mlra_mega.data.documents import ReadOptions
    from mlra_mega.data.preprocess import preprocess

    options = ReadOptions(json_key=args.json_key, doc_boundary=args.doc_boundary,
                          invalid_utf8=args.invalid_utf8, skip_bad_json=args.skip_bad_json)
    summary = preprocess(args.input, args.tokenizer, args.output_prefix, workers=args.workers,
                         options=options, overwrite=args.overwrite, eod_id=args.eod_id)
    print(summary.line())
    return 0


def _cmd_plan(args: argparse.Namespace) -> int:
    import dataclasses

    from mlra_mega.config import ConfigError, load_config
    from mlra_mega.plan import format_plan, plan

    cfg = load_config(args.config, list(args.overrides))
    if cfg.model.vocab_size is None:
        if cfg.data.tokenizer is None:
            raise ConfigError("model.vocab_size", "is not set and there is no data.tokenizer to take it from",
                              "give model.vocab_size=N (or data.tokenizer=DIR)")
        from mlra_mega.data.tokenizer import load_tokenizer

        vocab = load_tokenizer(cfg.data.tokenizer, cfg.data.eod_id).vocab_size
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=vocab))
    rows = plan(cfg, args.gpus, args.gpu_memory, args.gpus_per_node)
    print(f"[plan] {cfg.model.num_layers} layers, hidden {cfg.model.hidden_size}, {cfg.model.attention}, "
          f"{cfg.train.precision}, global batch {cfg.train.global_batch_size} x {cfg.model.seq_length} tokens, "
          f"micro-batch {cfg.train.micro_batch_size}; {args.gpus} GPU(s), {args.gpus_per_node} per node")
    print(format_plan(rows, args.gpu_memory, args.top))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mlra-mega", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("config", help="load, validate and print a resolved configuration")
    p.add_argument("config", nargs="?", default=None, help="YAML file (default: built-in defaults)")
    p.add_argument("overrides", nargs="*", metavar="section.key=value")
    p.add_argument("--keys", action="store_true", help="list every key with its type, default and help")
    p.set_defaults(func=_cmd_config)

    p = sub.add_parser("train", help="train a model from a YAML config (one process, or N under torchrun / "
                                     "the deepspeed launcher / srun)")
    p.add_argument("config", help="YAML file")
    p.add_argument("overrides", nargs="*", metavar="section.key=value")
    p.add_argument("--resume", default=None, metavar="auto|never|PATH",
                   help="auto (default): continue run.dir's newest complete checkpoint; never; or a checkpoint")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("submit", help="render the Slurm batch script for a run and sbatch it")
    p.add_argument("config", help="YAML file")
    p.add_argument("overrides", nargs="*", metavar="section.key=value")
    p.add_argument("--nodes", default="1", help="a count, or MIN-MAX: a requeued job may start on fewer nodes")
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--tasks-per-node", type=int, default=None, help="default: GPUs per node, or 1 with --cpu")
    p.add_argument("--cpus-per-task", type=int, default=None,
                   help="default: 8 with GPUs; with --cpu, a node's CPUs shared by its tasks")
    p.add_argument("--partition", default=None)
    p.add_argument("--account", default=None)
    p.add_argument("--time", default="24:00:00")
    p.add_argument("--signal-lead", type=int, default=300, metavar="SECONDS",
                   help="USR1 this long before the time limit: time enough for a checkpoint")
    p.add_argument("--job-name", default="mlra-mega")
    p.add_argument("--cpu", action="store_true", help="CPU nodes with gloo (no GPUs asked for)")
    p.add_argument("--dry-run", action="store_true", help="print the script, submit nothing")
    p.set_defaults(func=_cmd_submit)

    p = sub.add_parser("sweep", help="run a grid of runs (variants x depths x seeds) under one MLflow parent run")
    p.add_argument("spec", metavar="SPEC.yaml")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="for every member, after the spec's")
    p.add_argument("--seeds", type=int, default=None, help="this many seeds (0..N-1) instead of the spec's")
    p.add_argument("--submit", action="store_true", help="hand each member to Slurm (needs a tracking server)")
    p.add_argument("--nodes", default="1", help="with --submit: as for `submit`")
    for flag, default in (("--gpus-per-node", 8), ("--tasks-per-node", None), ("--cpus-per-task", None)):
        p.add_argument(flag, type=int, default=default, help="with --submit: as for `submit`")
    p.add_argument("--partition", default=None)
    p.add_argument("--account", default=None)
    p.add_argument("--time", default="24:00:00")
    p.add_argument("--cpu", action="store_true", help="with --submit: CPU nodes with gloo")
    p.add_argument("--dry-run", action="store_true", help="with --submit: print the scripts, submit nothing")
    p.set_defaults(func=_cmd_sweep)

    p = sub.add_parser("report", help="Markdown report with plots of a sweep (parent run) or an experiment")
    p.add_argument("target", metavar="PARENT_RUN_OR_EXPERIMENT", help="a parent run id, a sweep name or an experiment")
    p.add_argument("--tracking-uri", default=None, help="default: MLFLOW_TRACKING_URI or the embedded store under runs/")
    p.add_argument("--out", default=None, help="output directory (default: reports/TARGET)")
    p.set_defaults(func=_cmd_report)

    p = sub.add_parser("stacks", help="dump the Python stacks of every rank of a running job into its logs/")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.set_defaults(func=_cmd_stacks)

    p = sub.add_parser("sync-tracking", help="send MLflow what it lacks of a run (after the server was down at its end)")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--tracking-uri", default=None, help="default: the run's tracking.uri, MLFLOW_TRACKING_URI, or "
                                                         "the embedded store")
    p.set_defaults(func=_cmd_sync_tracking)

    p = sub.add_parser("plan", help="every layout (TP, PP, DP, ZeRO, recompute) of a config on N GPUs: memory per "
                                    "GPU, pipeline bubble, which fit, ranked")
    p.add_argument("config", help="YAML file")
    p.add_argument("overrides", nargs="*", metavar="section.key=value")
    p.add_argument("--gpus", type=int, required=True)
    p.add_argument("--gpu-memory", type=float, required=True, metavar="GIB")
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--top", type=int, default=None, metavar="N", help="show the first N layouts only")
    p.set_defaults(func=_cmd_plan)

    p = sub.add_parser("export-hf", help="a checkpoint -> a Hugging Face GPT-2 directory (weights, config, tokenizer)")
    p.add_argument("checkpoint", metavar="CHECKPOINT_DIR", help="a checkpoint, a run's checkpoints/ or a run directory")
    p.add_argument("output", metavar="OUTPUT_DIR")
    p.set_defaults(func=_cmd_export_hf)

    p = sub.add_parser("generate", help="continue a prompt from a checkpoint (any layout) or a Hugging Face export")
    p.add_argument("source", metavar="SOURCE", help="a checkpoint, a run directory, or an export-hf directory")
    p.add_argument("--prompt", default=None, metavar="TEXT")
    p.add_argument("--prompt-file", default=None, metavar="FILE", help="one prompt a line, each continued in turn")
    p.add_argument("--max-new-tokens", type=int, default=64, metavar="N")
    p.add_argument("--temperature", type=float, default=1.0, metavar="T", help="0: greedy (default 1.0)")
    p.add_argument("--top-k", type=int, default=0, metavar="K", help="sample from the K likeliest (0: all)")
    p.add_argument("--top-p", type=float, default=1.0, metavar="P", help="nucleus: the smallest set of mass P")
    p.add_argument("--seed", type=int, default=0, metavar="S", help="sampling seed (default 0)")
    p.set_defaults(func=_cmd_generate)

    p = sub.add_parser("evaluate", help="perplexity of a text file, or lm-eval tasks, from a checkpoint (any "
                                        "layout) or a Hugging Face export")
    p.add_argument("source", metavar="SOURCE", help="a checkpoint, a run directory, or an export-hf directory")
    p.add_argument("--text", default=None, metavar="FILE",
                   help="a text file (a document per line) or JSON Lines: prints `perplexity N`")
    p.add_argument("--stride", type=int, default=None, metavar="S",
                   help="rolling windows of the sequence length every S tokens (default: the sequence length, "
                        "the validation perplexity's windows)")
    p.add_argument("--tasks", default=None, metavar="NAMES", help="lm-eval tasks, separated by commas")
    p.add_argument("--include-path", default=None, metavar="DIR", help="a folder of local lm-eval task YAML files "
                                                                     "(configs/eval_tasks has two)")
    p.add_argument("--limit", type=int, default=None, metavar="N", help="at most N documents per task")
    p.add_argument("--output", default=None, metavar="FILE", help="the results JSON (default: stdout)")
    p.add_argument("--no-track", action="store_true", help="do not log the results in the checkpoint's MLflow run")
    p.set_defaults(func=_cmd_evaluate)

    p = sub.add_parser("reshard", help="a checkpoint of any layout -> one for TP x PP that resumes at any data-"
                                       "parallel size and ZeRO stage")
    p.add_argument("checkpoint", metavar="CHECKPOINT", help="a checkpoint, a run's checkpoints/ or a run directory")
    p.add_argument("output", metavar="OUT", help="a new directory: the resharded checkpoint (--resume OUT)")
    p.add_argument("--tensor", type=int, required=True, metavar="N", help="tensor-parallel size")
    p.add_argument("--pipeline", type=int, default=1, metavar="P", help="pipeline stages (default 1)")
    p.add_argument("--pipeline-layers", default=None, metavar="FIRST,LAST",
                   help="layers of the first and last stage (default: an even split)")
    p.set_defaults(func=_cmd_reshard)

    p = sub.add_parser("tokenizer", help="sentencepiece tokenizers")
    tok = p.add_subparsers(dest="tokenizer_command", required=True)
    t = tok.add_parser("train", help="train a sentencepiece model (byte fallback, end-of-document token)")
    t.add_argument("--input", nargs="+", required=True, metavar="FILE", help="text or JSON Lines (optionally .gz / .zst), parquet, or a datasets save_to_disk directory")
    t.add_argument("--vocab-size", type=int, required=True)
    t.add_argument("--model-type", choices=["bpe", "unigram"], default="bpe")
    t.add_argument("--output", required=True, metavar="DIR")
    t.add_argument("--seed", type=int, default=0, help="seed of the line sampling (default 0)")
    t.add_argument("--max-training-bytes", type=int, default=200_000_000,
                   help="sample lines when the input is larger (default 200 MB)")
    t.add_argument("--max-sentence-length", type=int, default=4192,
                   help="longer lines are cut at whitespace to fit (sentencepiece drops them otherwise)")
    t.add_argument("--json-key", default="text", help="the text's key (JSON Lines) or column (parquet, datasets)")
    t.add_argument("--threads", type=int, default=None, help="sentencepiece trainer threads (default 1)")
    t.set_defaults(func=_cmd_tokenizer_train)

    p = sub.add_parser("preprocess", help="text / JSON Lines -> megatron-core indexed dataset")
    p.add_argument("--input", nargs="+", required=True, metavar="FILE", help="text or JSON Lines (optionally .gz / .zst), parquet, or a datasets save_to_disk directory")
    p.add_argument("--tokenizer", required=True, metavar="MODEL",
                   help="tokenizer directory, a sentencepiece .model, or a Hugging Face tokenizer.json")
    p.add_argument("--eod-id", type=int, default=None, metavar="ID",
                   help="end-of-document id, for a tokenizer that has none of its own")
    p.add_argument("--output-prefix", required=True, metavar="PREFIX")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--json-key", default="text", help="the text's key (JSON Lines) or column (parquet, datasets)")
    p.add_argument("--doc-boundary", choices=["line", "blank-line"], default="line",
                   help="plain text: a document per line, or per blank-line-separated block")
    p.add_argument("--invalid-utf8", choices=["replace", "skip"], default="replace")
    p.add_argument("--skip-bad-json", action="store_true",
                   help="skip (and count) malformed JSON lines and lines without the key, instead of stopping")
    p.add_argument("--overwrite", action="store_true", help="replace an existing dataset at the prefix")
    p.set_defaults(func=_cmd_preprocess)

    p = sub.add_parser("quickstart", help="the main job on embedded defaults (configs/quickstart.yaml)")
    p.add_argument("overrides", nargs="*", metavar="section.key=value")
    p.set_defaults(func=_cmd_quickstart)
    return parser


def _quiet_known_warnings() -> None:
    import warnings

    # Optional accelerator libraries (Apex, Transformer Engine) that megatron-core announces
    # missing at import; their absence is expected and changes nothing we use.
    warnings.filterwarnings("ignore", message=r".*(Apex|Transformer Engine).* not installed")
    warnings.filterwarnings("ignore", message=r"full scope is deprecated")


MAX_ERROR_CHARS = 2000


def one_line(message: str) -> str:
    """An error as the user sees it: credentials masked, on one line, of bounded length."""
    from mlra_mega.credentials import mask

    text = mask(message).replace("\r", "\\r").replace("\n", "\\n")
    return text if len(text) <= MAX_ERROR_CHARS else text[:MAX_ERROR_CHARS] + " [...]"


_DASHED_OVERRIDE = re.compile(r"--([A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)+=.*)", re.S)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # `--train.steps=3` is the override `train.steps=3` (options of our own have no dot).
    argv = [m.group(1) if (m := _DASHED_OVERRIDE.fullmatch(x)) else x for x in (sys.argv[1:] if argv is None else argv)]
    args, extra = parser.parse_known_args(argv)
    # Dotted overrides may come after options (`submit cfg.yaml --nodes 2 train.steps=10`).
    if extra and hasattr(args, "overrides") and all("=" in x and not x.startswith("-") for x in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    _quiet_known_warnings()
    try:
        return args.func(args)
    except MlraMegaError as exc:
        print(f"mlra-mega: error: {one_line(str(exc))}", file=sys.stderr)
        return exc.exit_status
    except KeyboardInterrupt:
        print("mlra-mega: interrupted", file=sys.stderr)
        return 130
