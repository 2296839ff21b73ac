"""Experiment families: `unimodal sweep` plans a family, runs a tiny one end to end, ranks it, skips what is
finished, survives a broken run; a run killed during evaluation is not finished; errors name the problem."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from unimodal.cli.sweep import _finished, load_family, plan, run_sweep
from unimodal.evaluation.compare import read_curves

from ..conftest import TINY_DATA, TOKENIZER_CONFIG, TRANSFORMER_CONFIG

TINY = " ".join([*TINY_DATA, "--trainer.max_steps", "6", "--trainer.val_check_interval", "6",
                 "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"])  # fmt: skip


def _family(tmp_path: Path) -> Path:
    family = tmp_path / "fam"
    family.mkdir()
    spec = {
        "stage1": [str(TOKENIZER_CONFIG)],
        "stage2": [str(TRANSFORMER_CONFIG), "common.yaml"],
        "sort_by": "eval/test/caption_fidelity",
        "descending": True,
    }
    (family / "sweep.yaml").write_text(yaml.safe_dump(spec))
    (family / "common.yaml").write_text(
        "# tiny settings\nmodel: {model: {n_layers: 1, d_model: 32, n_heads: 2, ffn_hidden: 64}}\n"
        "data: {extra_val_splits: [heldout]}\nsamples: {prompts: []}\n"
        "evaluation: {splits: [test, heldout], num_captions: 8, judge_train_images: 128, table_rows: 4,"
        " rerank: 2, reranker_train_pairs: 256}\n"
    )
    (family / "small.yaml").write_text("# the tiny baseline\nrun: {tags: [small]}\n")
    (family / "wide.yaml").write_text("# twice the width\nmodel: {model: {d_model: 64}}\n")
    (family / "small.stage1.yaml").write_text(
        "# its own tokenizer with a smaller codebook\nmodel: {model: {codebook_size: 32}}\n"
    )
    return family


def test_family_plan_shares_the_tokenizer_and_names_runs(tmp_path):
    family = load_family(_family(tmp_path))
    assert family.runs == ["small", "wide"] and family.notes["wide"] == "twice the width"
    fits = plan(family, tmp_path / "runs")
    assert [(f.stage, f.name) for f in fits] == [
        ("tokenizer", "small-tokenizer"), ("transformer", "small"), ("tokenizer", "tokenizer"), ("transformer", "wide")
    ]  # fmt: skip
    assert str(fits[0].export) in fits[1].args and str(fits[2].export) in fits[3].args
    assert all("--run.group" in f.args and "fam" in f.args for f in fits)


def test_a_run_with_a_continuous_tokenizer_is_planned_as_a_continuous_fit(tmp_path):
    family_dir = _family(tmp_path)
    (family_dir / "small.stage1.yaml").write_text("# continuous tokens\nmodel: {model: {quantizer: kl}}\n")
    fits = plan(load_family(family_dir), tmp_path / "runs")
    assert [(f.stage, f.name) for f in fits] == [
        ("tokenizer", "small-tokenizer"), ("continuous", "small"), ("tokenizer", "tokenizer"), ("transformer", "wide")
    ]  # fmt: skip
    assert fits[1].command().startswith("unimodal continuous fit --config")


@pytest.mark.parametrize("args", [["--model.model.quantizer", "kl"], ["--model.model.quantizer=kl"]])
def test_a_continuous_quantizer_given_on_the_command_line_plans_continuous_fits(tmp_path, args):
    family = load_family(_family(tmp_path))
    fits = plan(family, tmp_path / "runs", stage1_args=args)
    assert [f.stage for f in fits] == ["tokenizer", "continuous", "tokenizer", "continuous"]
    assert [f.stage for f in plan(family, tmp_path / "runs", stage1_args=[*args, "--model.model.quantizer", "vq"])] == [
        "tokenizer", "transformer", "tokenizer", "transformer"
    ]  # fmt: skip


@pytest.mark.slow
def test_sweep_runs_a_tiny_family_skips_what_is_finished_and_survives_a_broken_run(
    tmp_path, hf_cache, capsys, monkeypatch
):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    family = _family(tmp_path)
    (family / "broken.yaml").write_text("# a typo\nmodel: {no_such_option: 1}\n")
    (family / "sweep.yaml").write_text((family / "sweep.yaml").read_text() + "runs: [small, broken, wide]\n")
    cache = f"--data.source.cache_dir {hf_cache} --run.wandb offline"
    args = dict(root=tmp_path / "runs", wandb="offline", stage1_args=f"{TINY} {cache} --model.model.codebook_size 64",
                stage2_args=f"{TINY} {cache}")  # fmt: skip
    # a broken run fails alone and is reported; the run after it still trains, and the family is compared
    with pytest.raises(RuntimeError, match="1 problem.*broken"):
        run_sweep(family, **args)
    out = capsys.readouterr().out
    assert "broken FAILED" in out and out.index("broken FAILED") < out.index("transformer wide\n")
    text = (tmp_path / "runs" / "fam" / "compare" / "compare.md").read_text()
    header = next(line for line in text.splitlines() if line.startswith("| run |")).split("|")
    rows = [line.split("|") for line in text.splitlines() if line.startswith("| ") and "---" not in line][1:]
    col = [c.strip() for c in header].index("eval/test/caption_fidelity")
    ranked = [float(r[col]) for r in rows]
    assert ranked == sorted(ranked, reverse=True) and rows[0][1].strip().startswith("**")  # best first, in bold
    assert {r[1].strip(" *") for r in rows} == {"small", "wide"} and "twice the width" in text
    curves = read_curves(tmp_path / "runs" / "fam" / "wide" / "csv" / "metrics.csv")
    assert "val_heldout/loss_image" in curves and "val/loss_image" in curves
    assert 0 <= curves["eval/test/caption_fidelity"][-1][1] <= 1
    assert 0 <= curves["eval/heldout/caption_fidelity_without_rerank"][-1][1] <= 1  # reranked: 2 candidates
    assert (tmp_path / "runs" / "fam" / "reranker").is_dir() and "eval/test/rerank_candidates" not in curves
    assert (tmp_path / "runs" / "fam" / "wide" / "eval_heldout.json").is_file()
    assert list((tmp_path / "runs" / "fam" / "wide" / "wandb").glob("offline-run-*/files/media/table/*"))
    fit = plan(load_family(family), tmp_path / "runs")[-1]
    assert fit.name == "wide" and _finished(fit, tmp_path / "runs" / "fam", "eval/test/caption_fidelity")
    # everything that finished is not trained again; the broken run is tried again and fails again
    with pytest.raises(RuntimeError, match="1 problem.*broken"):
        run_sweep(family, **args)
    out = capsys.readouterr().out
    assert out.count("done already") == 4 and "broken FAILED" in out
    # --force retries the runs named, and keeps the shared tokenizer the other runs trained on
    with pytest.raises(RuntimeError, match="1 problem.*broken"):
        run_sweep(family, only=["broken"], force=True, **args)
    out = capsys.readouterr().out
    assert "tokenizer tokenizer: done already" in out and "transformer broken\n" in out and "broken FAILED" in out


def test_a_run_killed_during_evaluation_is_not_finished(tmp_path):
    fit = plan(load_family(_family(tmp_path)), tmp_path / "runs")[-1]
    fit.export.mkdir(parents=True)
    csv = fit.export.parent / "csv" / "metrics.csv"
    csv.parent.mkdir()
    csv.write_text("epoch,step,val/loss\n0,10,1.0\n")
    assert not _finished(fit, tmp_path / "runs" / "fam", "eval/test/caption_fidelity")
    csv.write_text("epoch,step,val/loss,eval/test/caption_fidelity\n0,10,1.0,\n0,10,,0.5\n")
    assert _finished(fit, tmp_path / "runs" / "fam", "eval/test/caption_fidelity")


def test_sweep_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="no sweep.yaml"):
        load_family(tmp_path)
    family = _family(tmp_path)
    (family / "sweep.yaml").write_text("stage2: [missing.yaml]\n")
    with pytest.raises(FileNotFoundError, match="missing.yaml"):
        load_family(family)
    (family / "sweep.yaml").write_text("stage2: [common.yaml]\nruns: [nope]\n")
    with pytest.raises(FileNotFoundError, match="run 'nope' has no config"):
        load_family(family)
    (family / "sweep.yaml").write_text("stage2: common.yaml\nruns: wide\n")  # a single string is a list of one
    assert load_family(family).runs == ["wide"]
    (family / "sweep.yaml").write_text("stage2: [common.yaml]\nruns: [wide]\ndescending: 'yes'\n")
    with pytest.raises(ValueError, match="descending"):
        load_family(family)
    (family / "judge.yaml").write_text("# a run named like the family's judge cache\n")
    (family / "sweep.yaml").write_text("stage2: [common.yaml]\nruns: [judge]\n")
    with pytest.raises(ValueError, match="share a folder"):
        load_family(family)
