"""The committed experiment families in experiments/ parse: every run's configs through --print_config,
the GPU recipe, and the sweep's dry run."""

import pytest
import yaml

from unimodal.cli.main import main
from unimodal.cli.sweep import load_family, plan
from unimodal.training.fit import TokenizerCLI, TransformerCLI

from .conftest import REPO

FAMILIES = REPO / "experiments"
SHAPES = FAMILIES / "shapes"
# every fit each family plans, once (the shared tokenizer once per family, not once per run that uses it)
COMMITTED = [
    (name, fit.name)
    for name in ("heldout", "next-scale", "shapes")
    for fit in plan(load_family(FAMILIES / name), "runs")
]


@pytest.mark.parametrize(("name", "fit_name"), COMMITTED)
def test_committed_family_configs_parse_with_print_config(name, fit_name, capsys):
    family = load_family(FAMILIES / name)
    fit = next(f for f in plan(family, "runs") if f.name == fit_name)
    with pytest.raises(SystemExit) as exit_:
        (TokenizerCLI if fit.stage == "tokenizer" else TransformerCLI)(args=["fit", *fit.args, "--print_config"])
    assert exit_.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["run"]["name"] == fit.name and printed["run"]["group"] == name
    if fit.stage == "transformer":
        assert printed["evaluation"]["splits"] == ["test", "heldout"]


@pytest.mark.parametrize("stage", ["tokenizer", "transformer"])
def test_gpu_recipe_parses_with_print_config(stage, capsys):
    program, base, diff = ((TokenizerCLI, "tokenizer.yaml", "gpu.stage1.yaml") if stage == "tokenizer"
                           else (TransformerCLI, "transformer.yaml", "gpu.yaml"))  # fmt: skip
    with pytest.raises(SystemExit) as exit_:
        program(args=["fit", "--config", str(SHAPES / base), "--config", str(SHAPES / diff), "--print_config"])
    assert exit_.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["trainer"]["precision"] == "bf16-mixed"
    assert printed["data"]["source"]["shapes"]["resolution"] == 64


def test_sweep_command_dry_run_prints_fit_commands(capsys):
    assert main(["sweep", str(FAMILIES / "heldout"), "--dry-run"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    runs = load_family(FAMILIES / "heldout").runs
    assert out[0].startswith("unimodal tokenizer fit")
    assert [line.split("--run.name ")[1].split()[0] for line in out if "transformer fit" in line] == runs


EMOJI = FAMILIES / "emoji"


@pytest.mark.parametrize("gpu", [False, True])
@pytest.mark.parametrize("stage", ["tokenizer", "transformer"])
def test_emoji_recipes_parse_at_64_and_256_pixels(stage, gpu, capsys):
    program, base, diff = ((TokenizerCLI, "tokenizer.yaml", "gpu.stage1.yaml") if stage == "tokenizer"
                           else (TransformerCLI, "transformer.yaml", "gpu.yaml"))  # fmt: skip
    configs = ["--config", str(EMOJI / base)] + (["--config", str(EMOJI / diff)] if gpu else [])
    with pytest.raises(SystemExit) as exit_:
        program(args=["fit", *configs, "--print_config"])
    assert exit_.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["data"]["source"]["name"] == ("data/cache/emoji256" if gpu else "data/cache/emoji64")
    if stage == "tokenizer":
        model = printed["model"]["model"]
        assert model["resolution"] // 2 ** len(model["channel_mult"]) == 16  # 16x16 = 256 image tokens either way


def test_decoder_recipe_parses_with_print_config(capsys):
    from unimodal.training.fit import DecoderCLI

    with pytest.raises(SystemExit) as exit_:
        DecoderCLI(args=["fit", "--config", str(FAMILIES / "decoder" / "shapes.yaml"), "--print_config"])
    assert exit_.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["model"]["process"] == "flow" and printed["run"]["name"] == "shapes-decoder"


# the emoji family: each fit's stack of configs, as its results.md runs them
EMOJI = FAMILIES / "emoji"
EMOJI_FAMILY = {
    "next-scale-tokenizer": ("TokenizerCLI", ["tokenizer.yaml", "family/next-scale.stage1.yaml"]),
    "kl-tokenizer": ("TokenizerCLI", ["tokenizer.yaml", "family/kl.stage1.yaml"]),
    "raster": ("TransformerCLI", ["transformer.yaml", "family/common.yaml", "family/raster.yaml"]),
    "next-scale": ("TransformerCLI", ["transformer.yaml", "family/common.yaml", "family/next-scale.yaml"]),
    "continuous-flow": ("ContinuousCLI", ["family/continuous.yaml", "family/common.yaml"]),
    "decoder": ("DecoderCLI", ["family/decoder.yaml"]),
}


@pytest.mark.parametrize("run", sorted(EMOJI_FAMILY))
def test_emoji_family_configs_parse_with_print_config(run, capsys):
    from unimodal.training import fit

    program, configs = EMOJI_FAMILY[run]
    args = [a for c in configs for a in ("--config", str(EMOJI / c))]
    with pytest.raises(SystemExit) as exit_:
        getattr(fit, program)(args=["fit", *args, "--print_config"])
    assert exit_.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["run"]["name"] == run and printed["run"]["root"] == "runs/emoji-family"
    if program in ("TransformerCLI", "ContinuousCLI"):  # every stage 2 at the family's one budget
        assert printed["trainer"]["max_steps"] == 300 and printed["data"]["source"]["name"] == "data/cache/emoji64"
        # measured with the 1 : 1 loss on images, sampled at T 1 / cfg 3, whatever the recipe below it says now
        assert printed["model"]["loss_weights"] == {"text": 1.0, "image": 1.0} and printed["data"]["codes"] is None
        assert (printed["evaluation"]["temperature"], printed["evaluation"]["cfg_scale"]) == (1.0, 3.0)
