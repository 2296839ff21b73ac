"""Experiment families: `unimodal sweep` runs a tiny family end to end and ranks it; the committed
family configs parse; `compare` sorts, highlights the best run and keeps notes."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from unimodal.cli.sweep import _finished, load_family, plan, run_sweep
from unimodal.evaluation.compare import compare, read_curves

from .conftest import EXPERIMENTS, TINY_DATA

FAMILIES = EXPERIMENTS.parent
TINY = " ".join([*TINY_DATA, "--trainer.max_steps", "20", "--trainer.val_check_interval", "10",
                 "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"])  # fmt: skip


def _family(tmp_path: Path) -> Path:
    family = tmp_path / "fam"
    family.mkdir()
    spec = {
        "stage1": [str(EXPERIMENTS / "tokenizer.yaml")],
        "stage2": [str(EXPERIMENTS / "transformer.yaml"), "common.yaml"],
        "sort_by": "eval/test/caption_fidelity",
        "descending": True,
    }
    (family / "sweep.yaml").write_text(yaml.safe_dump(spec))
    (family / "common.yaml").write_text(
        "# tiny settings\nmodel: {model: {n_layers: 1, d_model: 32, n_heads: 2, ffn_hidden: 64}}\n"
        "data: {extra_val_splits: [heldout]}\nsamples: {prompts: []}\n"
        "evaluation: {splits: [test, heldout], num_captions: 8, judge_train_images: 256, table_rows: 4,"
        " rerank: 2, reranker_train_pairs: 512}\n"
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


def test_sweep_runs_a_tiny_family_then_skips_it(tmp_path, hf_cache, capsys, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    family = _family(tmp_path)
    cache = f"--data.source.cache_dir {hf_cache} --run.wandb offline"
    args = dict(root=tmp_path / "runs", wandb="offline", stage1_args=f"{TINY} {cache} --model.model.codebook_size 64",
                stage2_args=f"{TINY} {cache}")  # fmt: skip
    table = run_sweep(family, **args)
    text = table.read_text()
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
    capsys.readouterr()
    run_sweep(family, **args)  # everything finished: nothing retrains
    assert capsys.readouterr().out.count("done already") == 4
    run_sweep(family, only=["wide"], force=True, **args)  # reruns wide, keeps the tokenizer the others share
    out = capsys.readouterr().out
    assert "tokenizer tokenizer: done already" in out and "transformer wide\n" in out and "small" in out


def test_a_broken_run_fails_alone_and_is_reported(tmp_path, hf_cache, capsys):
    family = _family(tmp_path)
    (family / "broken.yaml").write_text("# a typo\nmodel: {no_such_option: 1}\n")
    (family / "sweep.yaml").write_text((family / "sweep.yaml").read_text() + "runs: [broken, wide]\n")
    cache = f"--data.source.cache_dir {hf_cache} --run.wandb disabled"
    with pytest.raises(RuntimeError, match="broken"):
        run_sweep(family, root=tmp_path / "runs", wandb="disabled", stage1_args=f"{TINY} {cache}",
                  stage2_args=f"{TINY} {cache}")  # fmt: skip
    assert (tmp_path / "runs" / "fam" / "wide" / "export").is_dir()  # the run after it still trained
    assert "| **wide** |" in (tmp_path / "runs" / "fam" / "compare" / "compare.md").read_text()


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


COMMITTED = [(name, run) for name in ("heldout", "shapes") for run in load_family(FAMILIES / name).runs]


@pytest.mark.parametrize(("name", "run"), COMMITTED)
def test_committed_family_configs_parse_with_print_config(name, run, capsys):
    from unimodal.training.fit import TokenizerCLI, TransformerCLI

    family = load_family(FAMILIES / name)
    for fit in plan(family, "runs"):
        if fit.name not in (run, f"{run}-tokenizer", "tokenizer"):
            continue
        with pytest.raises(SystemExit) as exit_:
            (TokenizerCLI if fit.stage == "tokenizer" else TransformerCLI)(args=["fit", *fit.args, "--print_config"])
        assert exit_.value.code in (0, None)
        printed = yaml.safe_load(capsys.readouterr().out)
        assert printed["run"]["name"] == fit.name and printed["run"]["group"] == name
        if fit.stage == "transformer":
            assert printed["evaluation"]["splits"] == ["test", "heldout"]


def test_compare_sorts_highlights_and_filters(tmp_path):
    for name, fid in (("a", 0.5), ("b", 0.9), ("c", 0.7)):
        run = tmp_path / name / "csv"
        run.mkdir(parents=True)
        (run / "metrics.csv").write_text(
            f"epoch,step,val/loss,eval/test/caption_fidelity\n0,10,{1 - fid},\n0,20,{0.9 - fid},\n0,20,,{fid}\n"
        )
    table, plot = compare([tmp_path / n for n in "abc"], tmp_path / "cmp", "eval/test/caption_fidelity", True,
                          notes={"b": "the good one"}, metrics=["fidelity"])  # fmt: skip
    rows = [line for line in table.read_text().splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert [r.split("|")[1].strip() for r in rows] == ["**b**", "c", "a"]
    assert "the good one" in rows[0] and "val/loss" not in table.read_text()
    assert plot.is_file()
    with pytest.raises(ValueError, match="no metric of the runs matches"):
        compare([tmp_path / "a"], tmp_path / "cmp2", metrics=["nothing"])


def test_sweep_command_dry_run_prints_fit_commands(capsys):
    from unimodal.cli.main import main

    assert main(["sweep", str(FAMILIES / "heldout"), "--dry-run"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    runs = load_family(FAMILIES / "heldout").runs
    assert out[0].startswith("unimodal tokenizer fit")
    assert [line.split("--run.name ")[1].split()[0] for line in out if "transformer fit" in line] == runs


@pytest.mark.parametrize("stage", ["tokenizer", "transformer"])
def test_gpu_recipe_parses_with_print_config(stage, capsys):
    from unimodal.training.fit import TokenizerCLI, TransformerCLI

    program, base, diff = ((TokenizerCLI, "tokenizer.yaml", "gpu.stage1.yaml") if stage == "tokenizer"
                           else (TransformerCLI, "transformer.yaml", "gpu.yaml"))  # fmt: skip
    with pytest.raises(SystemExit) as exit_:
        program(
            args=["fit", "--config", str(EXPERIMENTS / base), "--config", str(EXPERIMENTS / diff), "--print_config"]
        )
    assert exit_.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["trainer"]["precision"] == "bf16-mixed"
    assert printed["data"]["source"]["shapes"]["resolution"] == 64


def test_judge_describes_what_it_reads():
    import torch

    from unimodal.evaluation.judge import describe

    pred = {k: torch.zeros(2, 4, dtype=torch.long) for k in ("color", "shape", "size")}
    pred["color"][0, 1], pred["shape"][0, 1], pred["size"][0, 1] = 1, 3, 2  # red triangle, large, top right
    assert describe(pred, 0) == "top right: large red triangle" and describe(pred, 1) == "(empty)"
