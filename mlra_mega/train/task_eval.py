"""`eval.tasks` during training: lm-eval tasks on the live model, logged with the step.

Every `eval.tasks_interval` steps (and after the last step) every rank runs the same requests in
the same order on its shard of the model (TP ranks gather the logits together; data-parallel
replicas compute the same answers), in eval mode, with the global random generators left as they
were, so training goes on exactly as without it. The metrics go into the step's record
(`eval/<task>/<metric>`): metrics.jsonl, MLflow and the console get them once.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from mlra_mega.config import EvalConfig
from mlra_mega.generate import MegatronLM
from mlra_mega.lm_tasks import model_lm, run_tasks, task_metrics
from mlra_mega.train.callbacks import Callback, Priority

__all__ = ["TaskEvaluation"]


class TaskEvaluation(Callback):
    priority = Priority.DIAGNOSTICS - 1  # records metrics like the diagnostics, before the checkpointer

    def __init__(self, section: EvalConfig, tokenizer, context: int, vocab_size: int,
                 log: Callable[[str], None]) -> None:
        self.section, self.tokenizer, self.context, self.vocab_size, self.log = section, tokenizer, context, vocab_size, log

    def _due(self, trainer) -> bool:
        every = self.section.tasks_interval
        return trainer.step == trainer.end_step or bool(every and trainer.step % every == 0)

    def on_step_end(self, trainer, metrics) -> None:
        if trainer.stop_reason is not None or not self._due(trainer):
            return
        started = time.perf_counter()
        tok = self.tokenizer
        module = trainer.engine.module
        lm = model_lm(MegatronLM(module, self.context, self.vocab_size), tok.encode_one, tok.decode, tok.eod,
                      self.context)
        module.eval()
        try:
            with torch.no_grad():
                results = run_tasks(lm, self.section.tasks, self.section.tasks_include_path, self.section.tasks_limit)
        finally:
            module.train()
        values = task_metrics(results)
        for name, value in values.items():
            trainer.record_metric(name, value)
        shown = ", ".join(f"{k.removeprefix('eval/')} {v:.4g}" for k, v in values.items())
        self.log(f"[eval] step {trainer.step}: {shown} ({time.perf_counter() - started:.1f} s)")
