"""`mlra-mega export-hf`: a checkpoint (any TP size, any ZeRO stage) -> a Hugging Face directory.

Reads the checkpoint's sidecar (the model config) and its weights from DeepSpeed's files at any
layout and ZeRO stage, or from a resharded checkpoint (`train.elastic.read_state`: TP slices
joined, stages under their PP=1 names; checkpoints of earlier versions from their model/ files)
into one TP = 1, PP = 1 model in this process, and writes `to_hf`'s GPT2LMHeadModel (config and
safetensors weights) and the tokenizer (a fast tokenizer converted from the sentencepiece model,
plus the model file itself) to OUTPUT_DIR, through a temporary directory renamed when complete.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path


from mlra_mega.config import ConfigError, ParallelConfig, RunConfig, from_dict, migrate_saved

__all__ = ["load_checkpoint_model", "export_hf"]


def load_checkpoint_model(checkpoint: str | Path):
    """(TP = 1 model with the checkpoint's weights, its RunConfig, the checkpoint)."""
    from mlra_mega.model.build import build_model
    from mlra_mega.model.convert import load_shard, merge_shards, partition_dims
    from mlra_mega.train.checkpoint import find_checkpoint, read_sidecar
    from mlra_mega.train.elastic import read_state

    ckpt = find_checkpoint(Path(checkpoint), verify_hashes=True, log=print)
    if ckpt is None:
        raise ConfigError("checkpoint", f"no complete checkpoint at {checkpoint}",
                          "give a checkpoint directory (step...), a run's checkpoints/ or a run directory")
    sidecar = read_sidecar(ckpt)
    cfg: RunConfig = from_dict(RunConfig, migrate_saved(sidecar["config"]))
    cfg.validate()
    layout = sidecar["layout"]
    model = build_model(cfg.model, tensor_parallel=1)
    if (ckpt.path / "model").is_dir():  # written before the weights were kept once: per-TP-rank files
        load_shard(model, merge_shards(_old_model_files(ckpt.path, layout), partition_dims(model)))
    else:
        state = read_state(ckpt.path, layout)
        load_shard(model, {name: t["fp32"] for name, t in state.params.items()})
    return model.eval(), cfg, ckpt


def _old_model_files(path: Path, layout: dict) -> list[dict]:
    """Each TP rank's parameters, its stages joined, from a checkpoint's model/ files."""
    from mlra_mega.train.checkpoint import model_file
    from mlra_mega.train.safe_load import safe_load

    tp, pp = layout["tensor"], layout.get("pipeline", 1)
    names = [[model_file(t, s, pp) for s in range(pp)] for t in range(tp)]
    missing = [n for per_tp in names for n in per_tp if not (path / "model" / n).is_file()]
    if missing:
        raise ConfigError("checkpoint", f"{path} lacks model/{missing[0]} ({len(missing)} of {tp * pp} "
                          f"parameter files for tensor {tp} x pipeline {pp} missing)", "export a complete checkpoint")
    shards = []
    for per_tp in names:
        joined: dict = {}
        for n in per_tp:
            joined.update(safe_load(path / "model" / n, map_location="cpu"))
        shards.append(joined)
    return shards


def export_hf(checkpoint: str | Path, output_dir: str | Path, log=print) -> Path:
    """Writes the Hugging Face directory; returns its path."""
    from mlra_mega import distributed
    from mlra_mega.data.tokenizer import load_tokenizer
    from mlra_mega.model.hf import check_exportable, hf_fast_tokenizer, hf_tokenizer, to_hf

    out = Path(output_dir)
    if out.exists() and any(out.iterdir()):
        raise ConfigError("OUTPUT_DIR", f"{out} exists and is not empty", "choose a new or empty directory")
    distributed.setup(ParallelConfig(tensor=1), seed=0)
    try:
        model, cfg, ckpt = load_checkpoint_model(checkpoint)
        check_exportable(cfg.model)
        hf = to_hf(model, cfg.model)
        hf.config.mlra_seq_length = cfg.model.seq_length  # evaluation's window, as for the checkpoint
        if (ckpt.path / "tokenizer").is_dir():
            hf.config.eos_token_id = load_tokenizer(ckpt.path / "tokenizer").eod  # generation stops there
        tmp = out.with_name(out.name + f".tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        hf.save_pretrained(tmp)
        tok_dir = ckpt.path / "tokenizer"
        if (tok_dir / "tokenizer.model").is_file():
            hf_tokenizer(tok_dir / "tokenizer.model").save_pretrained(tmp)
            shutil.copy(tok_dir / "tokenizer.model", tmp / "tokenizer.model")
        elif (tok_dir / "tokenizer.json").is_file():
            hf_fast_tokenizer(load_tokenizer(tok_dir)).save_pretrained(tmp)
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
        log(f"[export-hf] {ckpt.path} ({cfg.model.attention}, {cfg.model.num_layers} layers) -> {out}")
        return out
    finally:
        distributed.teardown()
