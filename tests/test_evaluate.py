"""Evaluation: `evaluate --text` gives the same perplexity from a checkpoint and from its export, and
at stride = seq_length the validation perplexity on the same tokens; lm-eval on the two local tasks
(configs/eval_tasks) gives the loglikelihoods of a direct computation, into the checkpoint's MLflow
run; `eval.tasks` during training is logged with the step and changes no training number; bad input
is one line."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from mlra_mega.cli import main
from mlra_mega.config import ConfigError, load_config
from tests.test_generate import one_process
from tests.train.test_checkpoint import overrides, steps

REPO = Path(__file__).resolve().parents[1]
TASKS = REPO / "configs" / "eval_tasks"
STEPS = 4
# One sample per micro-batch and step: eval.iters=0 then validates every sample of the split.
RUN = ["train.global_batch_size=1", "train.micro_batch_size=1", f"train.steps={STEPS}", "checkpoint.interval=4",
       "eval.interval=4", "eval.iters=0", "model.seq_length=32"]

pytest.importorskip("lm_eval")


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path, sample_dataset: str) -> dict[str, Path]:
    """A tracked run with eval.tasks every 2 steps, and the same run without them (untracked)."""
    from mlra_mega.train.run import train

    root = tmp_path_factory.mktemp("evaluate")
    out = {}
    for name, extra in (("tasks", ["eval.tasks=[docstring_choice]", "eval.tasks_interval=2",
                                   f"eval.tasks_include_path={TASKS}"]),
                        ("plain", ["tracking.enabled=false"])):
        run = root / name
        train(load_config(None, overrides(tokenizer_dir, sample_dataset, run, *RUN, *extra)), log=lambda s: None)
        out[name] = run
    return out


def test_eval_tasks_during_training_are_logged_with_the_step_and_change_nothing(runs: dict[str, Path]) -> None:
    import mlflow

    with_tasks, plain = steps(runs["tasks"]), steps(runs["plain"])
    keys = ("train/loss", "train/grad_norm", "tev/mean")
    assert [[r[k] for k in keys] for r in with_tasks] == [[r[k] for k in keys] for r in plain]
    logged = {r["step"]: r for r in with_tasks if "eval/docstring_choice/acc" in r}
    assert sorted(logged) == [2, 4]
    for r in logged.values():
        assert 0 <= r["eval/docstring_choice/acc"] <= 1 and 0 <= r["eval/docstring_choice/acc_norm"] <= 1
    client = mlflow.tracking.MlflowClient(f"sqlite:///{runs['tasks'].parent / 'mlflow.db'}")
    run_id = (runs["tasks"] / "mlflow-run-id").read_text().strip()
    history = client.get_metric_history(run_id, "eval/docstring_choice/acc")
    assert sorted(m.step for m in history) == [2, 4]
    assert {m.step: m.value for m in history} == {s: r["eval/docstring_choice/acc"] for s, r in logged.items()}


def _validation_stream(run: Path, tokenizer_dir: Path) -> list[int]:
    """The validation split's tokens in order: its samples un-shuffled, chained (each sample's last
    label is the next one's first token)."""
    from mlra_mega.data.datasets import build_datasets
    from mlra_mega.data.tokenizer import load_tokenizer
    from mlra_mega.train.run import _with_tokenizer_vocab

    cfg, _ = _with_tokenizer_vocab(load_config(run / "config.yaml", []))
    valid = build_datasets(cfg.data, cfg.model.seq_length, load_tokenizer(tokenizer_dir), cfg.train.seed).valid
    order = np.argsort(valid.shuffle_index[:len(valid)])
    samples = [valid[int(i)] for i in order]
    stream = [int(t) for t in samples[0]["tokens"]]
    for prev, s in zip(samples, samples[1:] + [None]):
        if s is not None:
            assert int(prev["labels"][-1]) == int(s["tokens"][0]), "samples are not contiguous"
            stream += [int(t) for t in s["tokens"]]
    return stream + [int(samples[-1]["labels"][-1])]


def test_text_perplexity_equals_the_export_and_the_validation_perplexity(runs: dict[str, Path], tokenizer_dir: Path,
                                                                         tmp_path: Path,
                                                                         capsys: pytest.CaptureFixture[str]) -> None:
    from mlra_mega.evaluate import evaluate_text
    from mlra_mega.export import export_hf
    from mlra_mega.generate import load_source
    from mlra_mega.perplexity import rolling_perplexity

    run = runs["plain"]
    val = [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "eval/loss" in r][-1]
    stream = _validation_stream(run, tokenizer_dir)
    with one_process():
        src = load_source(run)
        ours = rolling_perplexity(src.lm, stream, window=32)
        assert ours.windows == (len(stream) - 1) // 32
        assert ours.nll / ours.tokens == pytest.approx(val["eval/loss"], rel=1e-5)
        # A smaller stride gives later tokens more context: a different, still finite, number.
        assert rolling_perplexity(src.lm, stream[:200], window=32, stride=8).windows == math.ceil((199 - 32) / 8) + 1

    text = tmp_path / "text.txt"
    text.write_text("Return the number of items in the list.\nRaise an error if the path does not exist.\n" * 6)
    hf = export_hf(run, tmp_path / "hf", log=lambda s: None)
    capsys.readouterr()
    assert main(["evaluate", str(run), "--text", str(text)]) == 0
    printed = capsys.readouterr().out.strip().splitlines()[-1]
    assert printed.startswith("perplexity ")
    from_ckpt = evaluate_text(run, text, quiet=True)
    assert float(printed.split()[1]) == pytest.approx(from_ckpt.value, rel=1e-6)
    from_hf = evaluate_text(hf, text, quiet=True)
    assert from_hf.tokens == from_ckpt.tokens > 32 and from_hf.windows == from_ckpt.windows
    assert from_hf.value == pytest.approx(from_ckpt.value, rel=1e-4)
    assert evaluate_text(run, text, stride=16, quiet=True).windows > from_ckpt.windows


def test_a_llama_checkpoint_evaluates_as_its_llama_export(llama_run: Path, tmp_path: Path) -> None:
    from mlra_mega.evaluate import evaluate_tasks, evaluate_text
    from mlra_mega.export import export_hf

    text = tmp_path / "text.txt"
    text.write_text("Return the number of items in the list.\nRaise an error if the path does not exist.\n" * 6)
    hf = export_hf(llama_run, tmp_path / "hf", log=lambda s: None)
    from_ckpt, from_hf = evaluate_text(llama_run, text, quiet=True), evaluate_text(hf, text, quiet=True)
    assert from_hf.tokens == from_ckpt.tokens > 32 and from_hf.windows == from_ckpt.windows
    assert from_hf.value == pytest.approx(from_ckpt.value, rel=1e-4)
    ours = evaluate_tasks(llama_run, ["docstring_choice"], TASKS, output=tmp_path / "ours.json")
    theirs = evaluate_tasks(hf, ["docstring_choice"], TASKS, output=tmp_path / "theirs.json")
    lls = [r[0][0] for s in ours["samples"]["docstring_choice"] for r in s["resps"]]
    assert len(lls) == 24
    assert lls == pytest.approx([r[0][0] for s in theirs["samples"]["docstring_choice"] for r in s["resps"]],
                                rel=1e-4, abs=1e-4)


def _direct_loglikelihood(model, vocab: int, context: list[int], continuation: list[int]) -> float:
    ids = torch.tensor([context + continuation])
    with torch.no_grad():
        logits = model(ids, torch.arange(ids.shape[1]).unsqueeze(0), None)[0].double()  # padding rows too, as in training
    logp = torch.log_softmax(logits, dim=-1)
    return float(sum(logp[len(context) - 1 + i, t] for i, t in enumerate(continuation)))


def _direct_rolling(model, vocab: int, full: list[int], window: int) -> float:
    """lm-eval's rolling log-likelihood of full[1:] (full[0] is the end-of-document prefix): chunks
    of `window` predictions, each predicted token seeing the `window` tokens before its chunk's end."""
    total, a, n = 0.0, 0, len(full) - 1
    assert n > window, "the documents should need more than one window"
    while a < n:
        b = min(a + window, n)
        s = max(0, b - window)
        ids = torch.tensor([full[s:b]])
        with torch.no_grad():
            logits = model(ids, torch.arange(ids.shape[1]).unsqueeze(0), None)[0].double()
        logp = torch.log_softmax(logits, dim=-1)
        total += float(sum(logp[j - s - 1, full[j]] for j in range(a + 1, b + 1)))
        a = b
    return total


def test_lm_eval_local_tasks_equal_a_direct_computation_and_reach_the_run(runs: dict[str, Path], tmp_path: Path) -> None:
    import mlflow

    from mlra_mega.evaluate import evaluate_tasks
    from mlra_mega.export import load_checkpoint_model
    from mlra_mega.data.tokenizer import load_tokenizer

    run = runs["tasks"]
    out = tmp_path / "results.json"
    results = evaluate_tasks(run, ["docstring_choice", "docstring_rolling"], TASKS, output=out)
    with one_process():
        model, cfg, ckpt = load_checkpoint_model(run)
        tok = load_tokenizer(ckpt.path / "tokenizer")
        vocab = tok.vocab_size
        choice = results["samples"]["docstring_choice"]
        assert len(choice) == 8
        checked = 0
        for sample in choice:
            doc = sample["doc"]
            for choice_text, resp in zip(doc["choices"], sample["resps"]):
                direct = _direct_loglikelihood(model, vocab, tok.sp.encode(doc["context"]), tok.sp.encode(choice_text))
                assert resp[0][0] == pytest.approx(direct, rel=1e-4, abs=1e-4)
                checked += 1
        assert checked == 24
        total_ll, words = 0.0, 0
        for sample in results["samples"]["docstring_rolling"]:
            text = sample["doc"]["text"]
            direct = _direct_rolling(model, vocab, [tok.eod, *tok.sp.encode(text)], cfg.model.seq_length)
            assert sample["resps"][0][0] == pytest.approx(direct, rel=1e-4)
            total_ll, words = total_ll + direct, words + len(text.split())
    saved = json.loads(out.read_text())
    assert saved["step"] == STEPS
    word_ppl = saved["metrics"]["eval/docstring_rolling/word_perplexity"]
    assert word_ppl == pytest.approx(math.exp(-total_ll / words), rel=1e-4)
    client = mlflow.tracking.MlflowClient(f"sqlite:///{run.parent / 'mlflow.db'}")
    run_id = (run / "mlflow-run-id").read_text().strip()
    for name, value in saved["metrics"].items():
        history = client.get_metric_history(run_id, name)
        assert [(m.step, m.value) for m in history if name.startswith("eval/docstring_rolling")] in ([], [(STEPS, value)])
    assert [m.step for m in client.get_metric_history(run_id, "eval/docstring_rolling/word_perplexity")] == [STEPS]


def test_bad_evaluate_input_is_one_line(runs: dict[str, Path], tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    run = runs["plain"]
    cases = [
        (["evaluate", str(run)], "--text"),
        (["evaluate", str(run), "--text", str(tmp_path / "none.txt")], "--text"),
        (["evaluate", str(run), "--text", str(TASKS / "docstring_rolling.jsonl"), "--stride", "99"], "--stride"),
        (["evaluate", str(run), "--tasks", "no_such_task", "--include-path", str(TASKS)], "no task named no_such_task"),
        (["evaluate", str(run), "--tasks", "docstring_choice", "--include-path", str(tmp_path / "x")], "--include-path"),
        (["evaluate", str(run), "--tasks", "lambada_openai", "--include-path", str(TASKS), "--no-track"], "offline"),
    ]
    for argv, expected in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert expected in err, (argv, err[-2000:])
        assert "Traceback" not in err
    for bad, field in ((["eval.tasks=[x]", "parallel.sequence_parallel=true", "parallel.tensor=2"], "eval.tasks"),
                       (["eval.tasks=[x]", "eval.tasks_interval=-1"], "eval.tasks_interval")):
        with pytest.raises(ConfigError, match=field):
            load_config(None, bad).validate()
    from mlra_mega.config import check_run_inputs

    with pytest.raises(ConfigError, match="eval.tasks_include_path: /nowhere is not a directory"):
        check_run_inputs(load_config(None, ["eval.tasks=[x]", "eval.tasks_include_path=/nowhere"]))
