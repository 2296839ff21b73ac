"""Shared fixtures and helpers: a tiny untrained bundle (built in about a second), one tiny trained system
(both stages through the real CLIs with the recipe shipped in unimodal/configs/, built once per test run;
tests that use it are marked slow), and the arguments of tiny fit runs."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

# Cache compiled bytecode even where the environment turns it off (PYTHONDONTWRITEBYTECODE): a test run starts
# about ten fresh Python processes (xdist workers, fits killed mid-run, DDP ranks, import probes), and each would
# otherwise compile torch, lightning and transformers from source again (~30 s of CPU each on a 2-core machine,
# ~12 s from the cache). Set before the first heavy import here, and inherited by every process started after.
os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
sys.dont_write_bytecode = False

import pytest  # noqa: E402
import torch  # noqa: E402

import unimodal  # noqa: E402

# The models here are tiny: one intra-op thread per process (this one, and the fits and DDP ranks it starts,
# which inherit the variable) costs little on an idle machine and avoids long stalls on shared cores, where
# every parallel region waits for its slowest, descheduled thread. A value set by the caller wins.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

REPO = Path(__file__).resolve().parent.parent
CONFIGS = Path(unimodal.__file__).resolve().parent / "configs"
TOKENIZER_CONFIG, TRANSFORMER_CONFIG = CONFIGS / "shapes-tokenizer.yaml", CONFIGS / "shapes-transformer.yaml"
TINY_DATA = [
    "--data.source.shapes.train_size", "256", "--data.source.shapes.test_size", "64",
    "--data.source.shapes.heldout_size", "32",
]  # fmt: skip
QUIET = ["--run.wandb", "disabled", "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]
TINY_TRANSFORMER = ["--model.model.n_layers", "2", "--model.model.d_model", "64", "--model.model.ffn_hidden", "128"]
SMALL_BATCH = ["--data.batch_size", "32"]  # for the tiny fits that only need their loss to fall


def tokenizer_args(root: Path, cache: Path, name: str, *extra: str) -> list[str]:
    """`unimodal tokenizer` arguments: a stage-1 fit of the shipped recipe on tiny data (K = 64)."""
    return [
        "fit", "--config", str(TOKENIZER_CONFIG), "--run.root", str(root), "--run.name", name, *QUIET,
        "--data.source.cache_dir", str(cache), *TINY_DATA, "--model.model.codebook_size", "64", *extra,
    ]  # fmt: skip


def transformer_args(root: Path, cache: Path, tokenizer: Path, name: str, *extra: str) -> list[str]:
    """`unimodal transformer` arguments: a stage-2 fit of the shipped recipe, a 2-layer model on tiny data.
    The BPE tokenizer is trained by the first run under `root` and shared by the others there."""
    return [
        "fit", "--config", str(TRANSFORMER_CONFIG), "--run.root", str(root), "--run.name", name, *QUIET,
        "--data.source.cache_dir", str(cache), *TINY_DATA, *TINY_TRANSFORMER,
        "--data.image_tokenizer", str(tokenizer), "--data.text_tokenizer", str(root / "text_tokenizer"), *extra,
    ]  # fmt: skip


def fit_tokenizer(root: Path, cache: Path, steps: int = 30, name: str = "tok", extra=()) -> Path:
    """A stage-1 fit in this process, validated once at its end; returns its export folder."""
    from unimodal.training.fit import TokenizerCLI

    every = ["--trainer.max_steps", str(steps), "--trainer.val_check_interval", str(steps)]
    TokenizerCLI(args=tokenizer_args(root, cache, name, *every, *extra))
    return root / name / "export"


def fit_transformer(root: Path, cache: Path, tokenizer: Path, steps: int = 30, name: str = "lm", extra=()) -> Path:
    """A stage-2 fit in this process, validated once at its end (with a 2-image sample grid); returns the
    bundle folder."""
    from unimodal.training.fit import TransformerCLI

    every = ["--trainer.max_steps", str(steps), "--trainer.val_check_interval", str(steps)]
    samples = ["--samples.prompts", "[a red circle at the top left]", "--samples.images_per_prompt", "2"]
    TransformerCLI(args=transformer_args(root, cache, tokenizer, name, *every, *samples, *extra))
    return root / name / "export"


class Started:
    """A command running in a fresh process while this one goes on (the repository on its path, so that
    `--trainer.callbacks` can name test callbacks); `result()` waits for it. Its output goes to a file:
    a full pipe would stop it."""

    def __init__(self, command: list[str], log: Path):
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
        self.log = log
        with open(log, "w") as out:
            self.process = subprocess.Popen(
                command, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )

    def result(self, timeout: int = 600) -> tuple[int, str]:
        """(exit code, the end of its output)."""
        try:
            code = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.stop()
            raise
        return code, self.log.read_text()[-3000:]

    def stop(self):
        """Kills it and what it started (a DDP rank), if still running."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


def start_unimodal(log: Path, *args: str) -> Started:
    """`python -m unimodal ARGS`, as a user runs it, in a fresh process."""
    return Started([sys.executable, "-m", "unimodal", *args], log)


# Session fixtures that train something: under pytest-xdist (`-n 2`) each worker process would build its own
# copy, so the tests that share one run on one worker (`--dist loadgroup`).
SHARED_RUNS = {"trained": "trained", "stage1": "resume", "stage2": "resume"}


def warn_if_built_twice(tmp_path_factory, fixture: str) -> None:
    """Called by a shared fixture as it builds: warns when another worker of this run built it already, i.e.
    when xdist's grouping is not working (pytest 9.2 with pytest-xdist 3.8 drops the groups without a word,
    pytest-dev/pytest-xdist#1386) and the run pays for each shared fit twice."""
    base = tmp_path_factory.getbasetemp()
    if not base.name.startswith("popen-gw"):
        return  # not under xdist
    seen = base.parent / f"built-{fixture}"
    try:
        seen.touch(exist_ok=False)
    except FileExistsError:
        import warnings

        warnings.warn(f"the shared fixture {fixture!r} was built by two xdist workers: --dist loadgroup is not "
                      "grouping tests (see pyproject.toml's pin of pytest)", stacklevel=2)  # fmt: skip


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook, which reads the group markers to schedule
def pytest_collection_modifyitems(items):
    for item in items:
        names = getattr(item, "fixturenames", ())
        if "trained" in names:
            item.add_marker(pytest.mark.slow)  # it fits both stages (once per test run)
        groups = sorted({group for fixture, group in SHARED_RUNS.items() if fixture in names})
        if groups:
            item.add_marker(pytest.mark.xdist_group("+".join(groups)))


@pytest.fixture(scope="session")
def hf_cache(tmp_path_factory) -> Path:
    """The `datasets` cache of the tiny fits, with their shapes splits already in it (so that fits running
    side by side read them, and none writes them while another does)."""
    from unimodal.data.shapes import ShapesConfig, shapes_dataset

    cache = tmp_path_factory.mktemp("hf_cache")
    sizes = dict(zip(TINY_DATA[::2], TINY_DATA[1::2]))
    shapes_dataset(ShapesConfig(**{k.rpartition(".")[2]: int(v) for k, v in sizes.items()}), cache_dir=str(cache))
    return cache


@pytest.fixture(scope="session")
def trained(tmp_path_factory, hf_cache) -> dict[str, Path]:
    """Tiny runs of both stages: {'root', 'tokenizer', 'bundle'}."""
    warn_if_built_twice(tmp_path_factory, "trained")
    root = tmp_path_factory.mktemp("runs")
    # batches of 32: the losses end at 0.41 (tokenizer) and 0.70 (transformer) of their first values; the fit
    # tests ask for < 0.7 and < 0.8
    tokenizer = fit_tokenizer(root, hf_cache, steps=40, extra=SMALL_BATCH)
    bundle = fit_transformer(root, hf_cache, tokenizer, steps=40, extra=SMALL_BATCH)
    return {"root": root, "tokenizer": tokenizer, "bundle": bundle}


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory) -> Path:
    """The folder of an untrained bundle shaped like the demo's (32 px images as 8 x 8 codes of K = 64, BPE
    on shapes captions, a 2-layer transformer): for what a bundle does, not what training taught it."""
    import torch

    from unimodal.data.shapes import COLORS, POSITIONS, SHAPES, SIZES
    from unimodal.generation.bundle import Bundle
    from unimodal.lm.transformer import TransformerConfig, build_transformer
    from unimodal.lm.vocab import JointVocab
    from unimodal.tokenizers.image import ImageTokenizer, ImageTokenizerConfig
    from unimodal.tokenizers.text import TextTokenizer

    captions = [f"a {z} {c} {s} at the {p}" for z in SIZES for c in COLORS for s in SHAPES for p in POSITIONS]
    text = TextTokenizer.train(captions, vocab_size=300)
    torch.manual_seed(0)
    image = ImageTokenizer(ImageTokenizerConfig(resolution=32, channels=8, codebook_size=64)).eval()
    vocab = JointVocab(text_size=text.vocab_size, image_size=64, image_grid=image.grid, max_text_tokens=32)
    transformer = build_transformer(TransformerConfig(n_layers=2, d_model=64, n_heads=4, ffn_hidden=128), vocab)
    return Bundle(text, image, vocab, transformer.eval()).save(tmp_path_factory.mktemp("tiny") / "bundle")


@pytest.fixture(scope="session")
def bundle(tiny_bundle):
    """The tiny untrained bundle, loaded."""
    from unimodal.generation.bundle import Bundle

    return Bundle.load(tiny_bundle)
