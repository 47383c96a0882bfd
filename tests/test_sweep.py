"""Sweeps and reports: a 2-member sweep under one MLflow parent run, its report (table, plots,
artifacts), finished members skipped and an interrupted one resumed; the variant presets and the
matched-init control."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import yaml

from mlra_mega.config import ConfigError, load_config, with_values
from mlra_mega.variants import VARIANTS, variant_overrides

REPO = Path(__file__).resolve().parent.parent


def _spec(tmp_path: Path, tokenizer_dir: Path, dataset: str, **extra) -> Path:
    spec = {"name": "tiny", "base": str(REPO / "configs" / "quickstart.yaml"),
            "overrides": [f"data.tokenizer={tokenizer_dir}", f"data.paths=[{dataset}]", f"run.root={tmp_path / 'runs'}",
                          "train.steps=6", "eval.interval=3", "eval.iters=1", "model.seq_length=32",
                          "train.micro_batch_size=2", "diagnostics.interval=3", "diagnostics.grad_variance_interval=1",
                          "checkpoint.interval=3"],
            "axes": {"variant": ["vanilla", "mlra"], "model.num_layers": [2]}, "seeds": 1, **extra}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def test_sweep_skips_resumes_and_reports(tmp_path: Path, tokenizer_dir: Path, sample_dataset: str) -> None:
    from mlflow.tracking import MlflowClient

    from mlra_mega.report import build_report
    from mlra_mega.sweep import load_spec, members, run_sweep
    from mlra_mega.train.run import train

    spec = load_spec(_spec(tmp_path, tokenizer_dir, sample_dataset))
    grid = members(spec)
    assert [m.name for m in grid] == ["vanilla-L2-s0", "mlra-L2-s0"]
    # The second member was interrupted after step 3 (it has a checkpoint there).
    interrupted = with_values(grid[1].cfg, {"train.stop_at": 3})
    train(interrupted, log=lambda s: None)

    lines: list[str] = []
    outcomes = run_sweep(spec, log=lines.append)
    assert outcomes == [("vanilla-L2-s0", "done at step 6"), ("mlra-L2-s0", "done at step 6")]
    assert any("mlra-L2-s0: resuming" in x for x in lines) and any("resuming" in x and "at step 3" in x for x in lines)
    assert run_sweep(spec, log=lines.append) == [("vanilla-L2-s0", "skipped"), ("mlra-L2-s0", "skipped")]

    uri = f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("quickstart")
    (parent,) = client.search_runs([exp.experiment_id], filter_string="tags.sweep_parent = 'tiny'")
    children = client.search_runs([exp.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert sorted(r.info.run_name for r in children) == ["mlra-L2-s0", "vanilla-L2-s0"]
    for run in children:
        assert run.data.tags["sweep"] == "tiny" and run.data.tags["model.num_layers"] == "2"
        assert run.info.status == "FINISHED"
        assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "train/loss")) == list(range(1, 7))
        assert {"tev/gradvar_spearman", "tev/gradvar_spearman_diff", "stability/grad_var_embedding"} <= set(run.data.metrics)

    report = build_report("tiny", uri, tmp_path / "report", log=lambda s: None)
    text = report.read_text()
    assert "| 2 | mlra | 1 |" in text and "| 2 | vanilla | 1 |" in text
    for png in ("tev_mean.png", "loss.png", "grad_norm.png", "resid_var.png"):
        assert (tmp_path / "report" / png).stat().st_size > 1000 and f"]({png})" in text
    logged = {Path(a.path).name for a in client.list_artifacts(parent.info.run_id, "report")}
    assert logged == {"report.md", "tev_mean.png", "loss.png", "grad_norm.png", "resid_var.png"}
    # The table's numbers are the runs' own: the final validation perplexity of each member.
    for run in children:
        ppl = run.data.metrics["eval/ppl"]
        assert f"{ppl:.5g} +- 0" in text


def test_sweep_submit_needs_a_tracking_server(tmp_path: Path, tokenizer_dir: Path, sample_dataset: str) -> None:
    from mlra_mega.sweep import load_spec, run_sweep

    spec = load_spec(_spec(tmp_path, tokenizer_dir, sample_dataset))
    with pytest.raises(ConfigError, match="tracking.uri.*SQLite"):
        run_sweep(spec, submit=lambda path: "never")


@pytest.mark.parametrize("bad,field", [({"axes": {}}, "sweep.axes"), ({"seeds": "x"}, "sweep.seeds"),
                                       ({"name": "a/b"}, "sweep.name"), ({"extra": 1}, "sweep.extra")])
def test_bad_specs_name_the_field(bad: dict, field: str, tmp_path: Path) -> None:
    from mlra_mega.sweep import load_spec

    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump({"name": "s", "axes": {"variant": ["mlra"]}, **bad}))
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_spec(path)


@pytest.mark.parametrize("grids,field", [([], "sweep.grids"), ([{"axes": {"variant": ["mlra"]}, "x": 1}], r"grids\[0\]"),
                                         ([{"axes": {"variant": ["mlra"]}}, {"axes": {"variant": ["mlra"]}}], "two grids"),
                                         ([{"axes": {}}], r"grids\[0\]\.axes")])
def test_bad_grids_name_the_field(grids: list, field: str, tmp_path: Path) -> None:
    from mlra_mega.sweep import load_spec, members

    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump({"name": "s", "grids": grids}))
    with pytest.raises(ConfigError, match=field):
        members(load_spec(path))


def test_grids_are_a_union_each_with_its_seeds(tmp_path: Path) -> None:
    from mlra_mega.sweep import load_spec, members

    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump({"name": "s", "grids": [{"axes": {"variant": ["vanilla", "mlra"]}, "seeds": 2},
                                                           {"axes": {"variant": ["embed_ln"]}, "seeds": [7]}]}))
    assert sorted(m.name for m in members(load_spec(path))) == ["embed_ln-s7", "mlra-s0", "mlra-s1", "vanilla-s0",
                                                                 "vanilla-s1"]


def test_variants_and_the_matched_init_control() -> None:
    model = load_config(None, ["model.hidden_size=256", "model.num_heads=4"]).model  # d_head = r = 64
    cfgs = {v: load_config(None, ["model.hidden_size=256", "model.num_heads=4", *variant_overrides(v, model)]).model
            for v in VARIANTS}
    assert (cfgs["vanilla"].attention, cfgs["vanilla"].embedding) == ("mha", "vanilla")
    assert cfgs["scaled_embed"].embedding == "scaled" and cfgs["embed_ln"].embedding == "layernorm"
    assert cfgs["mlra"].attention == "mlra" and cfgs["mlra"].qkv_init_std is None
    matched = cfgs["mha_matched_init"]
    # d sigma_mha^2 = d r sigma^4: each projection's output variance at init equals MLRA's.
    assert matched.attention == "mha" and matched.qkv_init_std ** 2 == pytest.approx(64 * 0.02 ** 4)
    with pytest.raises(ConfigError, match="unknown variant"):
        variant_overrides("mlra2", model)


def test_matched_init_reaches_the_qkv_weights() -> None:
    from mlra_mega import distributed
    from mlra_mega.model.build import build_model

    model_cfg = load_config(None, ["model.hidden_size=256", "model.num_heads=4", "model.num_layers=1",
                                   "model.vocab_size=256"]).model
    cfg = load_config(None, ["model.hidden_size=256", "model.num_heads=4", "model.num_layers=1", "model.vocab_size=256",
                             *variant_overrides("mha_matched_init", model_cfg)])
    distributed.setup(cfg.parallel, 0)
    try:
        model = build_model(cfg.model, tensor_parallel=1)
        weight = model.decoder.layers[0].self_attention.linear_qkv.weight
        assert float(weight.detach().std()) == pytest.approx(0.02 ** 2 * math.sqrt(64), rel=0.02)
    finally:
        distributed.teardown()


def test_seeds_option_replaces_the_specs_seeds(tmp_path: Path, tokenizer_dir: Path, sample_dataset: str) -> None:
    from mlra_mega.sweep import load_spec, members

    grid = members(load_spec(_spec(tmp_path, tokenizer_dir, sample_dataset), seeds=3))
    assert [m.name for m in grid] == [f"{v}-L2-s{s}" for v in ("vanilla", "mlra") for s in range(3)]
    assert [m.cfg.train.seed for m in grid] == [0, 1, 2, 0, 1, 2]
    assert len({m.cfg.run.dir for m in grid}) == 6


def test_a_member_interrupted_before_its_first_checkpoint_is_kept_aside(tmp_path: Path) -> None:
    from mlra_mega.sweep import set_aside_unresumable

    member = tmp_path / "vanilla-s0"
    member.mkdir()
    (member / "metrics.jsonl").write_text('{"step": 1, "train/loss": 6.0}\n')
    notes: list[str] = []
    aside = set_aside_unresumable(member, 60, notes.append)
    assert aside == tmp_path / "vanilla-s0.interrupted-1" and (aside / "metrics.jsonl").is_file()
    assert not member.exists() and "starting it again" in notes[0]
    assert set_aside_unresumable(member, 60, notes.append) is None  # nothing there: nothing to do
