"""`mlra-mega reshard`: a checkpoint of any layout rewritten as one for a given TP x PP, which a run
of that TP x PP resumes at any data-parallel size and ZeRO stage."""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import torch

from mlra_mega.config import ConfigError, RunConfig, check_tensor_parallel, from_dict, migrate_saved, pipeline_split
from mlra_mega.train.checkpoint import SIDECAR, _write_manifest, find_checkpoint, read_sidecar
from mlra_mega.train.elastic import describe_layout, read_state, slice_state, stage_names, write_elastic

__all__ = ["reshard"]


def reshard(checkpoint: str | Path, output: str | Path, tensor: int, pipeline: int = 1,
            pipeline_layers: list[int] | None = None, log: Callable[[str], None] = print) -> Path:
    """`mlra-mega reshard`: any checkpoint -> a checkpoint of TP `tensor` x PP `pipeline` that a
    run of that TP x PP resumes at any data-parallel size and ZeRO stage (each rank reads only
    its own file). Written to a temporary directory renamed when complete."""
    out = Path(output)
    if out.exists() and any(out.iterdir()):
        raise ConfigError("OUTPUT_DIR", f"{out} exists and is not empty", "choose a new or empty directory")
    ckpt = find_checkpoint(Path(checkpoint), verify_hashes=True, log=log)
    if ckpt is None:
        raise ConfigError("checkpoint", f"no complete checkpoint at {checkpoint}",
                          "give a checkpoint directory (step...), a run's checkpoints/ or a run directory")
    sidecar = read_sidecar(ckpt)
    cfg: RunConfig = from_dict(RunConfig, migrate_saved(sidecar["config"]))
    check_tensor_parallel(cfg.model, tensor)
    per_stage = pipeline_split(cfg.model.num_layers, pipeline, pipeline_layers)
    start = time.perf_counter()
    full = read_state(ckpt.path, sidecar["layout"])
    tmp = out.with_name(out.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tied = cfg.model.tied_embeddings
    for t in range(tensor):
        sliced = slice_state(full, tensor, t, ckpt.path)
        for stage in range(pipeline):
            write_elastic(tmp, sliced, tensor, t, stage, stage_names(sliced.params, per_stage, stage, tied))
    layout = {"tensor": tensor, "pipeline": pipeline, "format": "elastic"}
    config = {**sidecar["config"], "parallel": {**sidecar["config"].get("parallel", {}), "tensor": tensor,
                                                "pipeline": pipeline, "pipeline_layers": pipeline_layers}}
    torch.save({**sidecar, "layout": layout, "config": config}, tmp / SIDECAR)
    if (ckpt.path / "tokenizer").is_dir():
        shutil.copytree(ckpt.path / "tokenizer", tmp / "tokenizer")
    _write_manifest(tmp)
    if out.exists():
        out.rmdir()
    os.replace(tmp, out)
    log(f"[reshard] {ckpt.path} ({describe_layout(sidecar['layout'])}, step {sidecar['step']}) -> {out} "
        f"({describe_layout(layout)}, {tensor * pipeline} files) in {time.perf_counter() - start:.1f} s; resume "
        f"with parallel.tensor={tensor} parallel.pipeline={pipeline} checkpoint.resume={out}")
    return out
