"""Downstream tasks through lm-eval: our models as an lm-eval LM, tasks run offline, results as metrics.

`ModelLM` serves lm-eval's three request kinds from anything with `logits(ids)` (a checkpoint's
model, a live training model whose TP ranks call together, a Hugging Face export):

- `loglikelihood(context, continuation)`: the continuation's summed log-probability given the
  context, and whether greedy decoding would produce it. Context and continuation are encoded
  separately (sentencepiece puts the word boundary on the continuation's first piece); an empty
  context is the end-of-document id; a pair longer than the model's context keeps its last
  tokens.
- `loglikelihood_rolling(text)`: lm-eval's rolling windows (its own `get_rolling_token_windows`),
  the first token conditioned on the end-of-document id.
- `generate_until`: greedy, stopping at any of the request's strings or its token limit.

Log-probabilities are over every row of the output layer (the vocabulary's padding included), as
training's loss is; greedy choices are over the tokenizer's ids. Every request runs one at a time in request order, so ranks that share a model stay in lockstep.
No machine here reaches a dataset hub: the hub is switched off for the run, and a task whose data
must be downloaded fails with one line naming the task and the fix (a local task: a YAML file with
`custom_dataset` or `dataset_path: json` under `--include-path`).
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from mlra_mega.errors import ConfigError

__all__ = ["check_lm_eval", "model_lm", "run_tasks", "task_metrics"]


def check_lm_eval(field: str) -> None:
    """lm-eval is an extra: say how to get it, at the edge."""
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise ConfigError(field, "needs lm-eval, which is not installed",
                          "pip install 'mlra_mega[eval]' (scripts/setup_cpu.sh installs it)") from None


def model_lm(lm, encode: Callable[[str], list[int]], decode: Callable[[list[int]], str], eod: int, context: int):
    """An lm-eval LM over `lm.logits` (the class is made here so lm-eval is imported only when used)."""
    from lm_eval.api.model import LM
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    class ModelLM(LM):
        @torch.no_grad()
        def _score(self, context_ids: list[int], continuation: list[int]) -> tuple[float, bool]:
            continuation = continuation[-context:]
            ids = (context_ids + continuation)[-(context + 1):]
            logits = lm.logits(ids[:-1])[-len(continuation):].double()
            targets = torch.tensor(continuation, dtype=torch.long)
            logp = torch.log_softmax(logits, dim=-1).gather(1, targets.unsqueeze(1)).sum()
            return float(logp), bool((logits[:, :lm.vocab].argmax(dim=-1) == targets).all())

        def loglikelihood(self, requests) -> list[tuple[float, bool]]:
            out = []
            for req in requests:
                ctx, cont = req.args
                cont_ids = encode(cont)
                if not cont_ids:
                    raise ConfigError("--tasks", f"a continuation encodes to no tokens ({cont!r})",
                                      "check the task's doc_to_choice / doc_to_target")
                out.append(self._score(encode(ctx) if ctx else [eod], cont_ids))
            return out

        def loglikelihood_rolling(self, requests) -> list[float]:
            out = []
            for req in requests:
                total = 0.0
                for pair in get_rolling_token_windows(encode(req.args[0]), prefix_token=eod, max_seq_len=context,
                                                      context_len=1):
                    ctx_ids, pred = make_disjoint_window(pair)
                    total += self._score(ctx_ids, pred)[0]
                out.append(total)
            return out

        @torch.no_grad()
        def generate_until(self, requests) -> list[str]:
            out = []
            for req in requests:
                ctx, kwargs = req.args
                until = kwargs.get("until") or []
                until = [until] if isinstance(until, str) else list(until)
                ids, new = (encode(ctx) or [eod])[-context:], []
                for _ in range(int(kwargs.get("max_gen_toks", 64))):
                    token = int(lm.logits((ids + new)[-context:])[-1, :lm.vocab].argmax())
                    if token == eod:
                        break
                    new.append(token)
                    text = decode(new)
                    if any(u in text for u in until):
                        break
                text = decode(new)
                for u in until:
                    text = text.split(u)[0]
                out.append(text)
            return out

    return ModelLM()


def run_tasks(model, tasks: Sequence[str], include_path: str | Path | None = None, limit: int | None = None,
              seed: int = 1234) -> dict[str, Any]:
    """lm-eval's results for `tasks` (its `results` / `n-samples` / `samples` dict)."""
    check_lm_eval("--tasks")
    os.environ["HF_DATASETS_OFFLINE"] = "1"  # fail at once, not after minutes of retries
    os.environ["HF_HUB_OFFLINE"] = "1"
    import logging

    from lm_eval import simple_evaluate

    logging.getLogger("lm_eval").setLevel(logging.ERROR)  # its INFO and advice lines would drown the log
    if include_path is not None and not Path(include_path).is_dir():
        raise ConfigError("--include-path", f"{include_path} is not a directory", "give the folder of the task YAML files")
    manager = _manager(str(Path(include_path).resolve()) if include_path else None)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise ConfigError("--tasks", f"no task named {unknown[0]}",
                          "name an lm-eval task, or a local one under --include-path (lm-eval --tasks list)")
    state = _rng_state()
    try:
        # lm-eval seeds the global generators when given seeds: a training run's must stay as they are.
        results = simple_evaluate(model=model, tasks=list(tasks), task_manager=manager, limit=limit,
                                  random_seed=None, numpy_random_seed=None, torch_random_seed=None,
                                  fewshot_random_seed=seed, bootstrap_iters=0, log_samples=True)
    except (ConnectionError, OSError) as exc:
        said = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
        if isinstance(exc, ConnectionError) or "offline" in str(exc).lower() or "hub" in str(exc).lower():
            raise ConfigError("--tasks", f"a task needs a download, and this machine is offline ({said})",
                              "define the task on local files (custom_dataset, or dataset_path: json with "
                              "data_files) and pass its folder as --include-path") from None
        raise ConfigError("--tasks", f"a task's data cannot be read ({said})",
                          "check the data files its YAML names (relative paths are read from the working "
                          "directory; custom_dataset reads beside the YAML)") from None
    finally:
        _set_rng_state(state)
    return results


@functools.lru_cache(maxsize=4)
def _manager(include_path: str | None):
    """lm-eval's task index (about 10 s to build: once per process and folder)."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=include_path)


def task_metrics(results: dict[str, Any]) -> dict[str, float]:
    """`eval/<task>/<metric>` for every numeric metric (lm-eval's filter name kept unless `none`)."""
    out: dict[str, float] = {}
    for task, values in results["results"].items():
        for key, value in values.items():
            if key in ("alias", "sample_len") or "_stderr" in key or not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            metric, _, filt = key.partition(",")
            name = metric if filt in ("", "none") else f"{metric}_{filt}"
            if math.isfinite(value):
                out[f"eval/{task}/{name}"] = float(value)
    return out


def _rng_state() -> tuple:
    import random

    import numpy as np

    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    return random.getstate(), np.random.get_state(), torch.get_rng_state(), cuda


def _set_rng_state(state: tuple) -> None:
    import random

    import numpy as np

    random.setstate(state[0])
    np.random.set_state(state[1])
    torch.set_rng_state(state[2])
    if state[3] is not None:
        torch.cuda.set_rng_state_all(state[3])
