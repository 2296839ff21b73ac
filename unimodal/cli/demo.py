"""`unimodal demo`: the whole pipeline on the built-in shapes, with the recipe shipped in unimodal/configs/.

1. stage 1 fit run: image tokenizer        -> OUT/runs/shapes-tokenizer/export
2. stage 2 fit run: BPE + pre-tokenizing + transformer -> OUT/runs/shapes-transformer/export (the bundle)
3. sampling at the recipe's temperature (0.7): OUT/samples.png
4. evaluation on test and heldout, the same sampling: OUT/eval_{split}.json
5. comparison of the two runs' logs: OUT/compare/
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import yaml

CONFIGS = Path(__file__).resolve().parent.parent / "configs"  # shipped with the package

DEMO_PROMPTS = [
    "a large red circle at the top left",
    "a large blue square at the bottom right",
    "a large green triangle at the top right",
    "a large yellow cross at the bottom left",
    "purple circle, bottom right, large",
    "a large cyan square at the top left and a small red triangle at the bottom right",
]

QUICK = [  # a smoke run of the same pipeline (under a minute on 2 CPU cores): the pipeline, not the model
    "--trainer.max_steps", "40", "--trainer.val_check_interval", "20", "--data.batch_size", "16",
    "--data.source.shapes.train_size", "600", "--data.source.shapes.test_size", "64",
    "--data.source.shapes.heldout_size", "64",
]  # fmt: skip
QUICK_JUDGE = {"train_images": 1024, "epochs": 2}  # the quick run's judge (JudgeConfig fields)


def run_demo(out: Path, wandb: str = "auto", quick: bool = False) -> dict:
    from unimodal.evaluation.compare import compare
    from unimodal.evaluation.evaluate import evaluate_bundle, write_json
    from unimodal.evaluation.judge import JudgeConfig
    from unimodal.generation.bundle import Bundle
    from unimodal.generation.sampling import SamplingParams
    from unimodal.training.fit import TokenizerCLI, TransformerCLI
    from unimodal.training.loggers import finish_wandb
    from unimodal.viz import make_grid

    out = out.resolve()
    runs = out / "runs"
    common = ["--run.root", str(runs), "--run.wandb", wandb, "--data.source.cache_dir", str(out / "hf_cache")]
    common += QUICK if quick else []
    timings = {}

    start = time.perf_counter()
    TokenizerCLI(args=["fit", "--config", str(CONFIGS / "shapes-tokenizer.yaml"), *common])
    finish_wandb()
    timings["stage1_s"] = time.perf_counter() - start
    tokenizer_dir = runs / "shapes-tokenizer" / "export"

    start = time.perf_counter()
    TransformerCLI(args=[
        "fit", "--config", str(CONFIGS / "shapes-transformer.yaml"), *common,
        "--data.image_tokenizer", str(tokenizer_dir),
        "--data.text_tokenizer", str(runs / "shapes-transformer" / "text_tokenizer"),
    ])  # fmt: skip
    finish_wandb()
    timings["stage2_s"] = time.perf_counter() - start
    bundle_dir = runs / "shapes-transformer" / "export"

    start = time.perf_counter()
    bundle = Bundle.load(bundle_dir)
    # the recipe's sampling temperature (its `samples` section, which the fit's grids use too; docs/results.md)
    recipe = yaml.safe_load((CONFIGS / "shapes-transformer.yaml").read_text())
    sampling = SamplingParams(temperature=recipe["samples"]["temperature"], seed=0)
    params = dataclasses.replace(sampling, images_per_prompt=4)
    images = bundle.generate(DEMO_PROMPTS, params)
    labels = [p for p in DEMO_PROMPTS for _ in range(params.images_per_prompt)]
    make_grid(images, labels, ncol=8).save(out / "samples.png")
    timings["sample_s"] = time.perf_counter() - start

    start = time.perf_counter()
    results = {}
    n = 32 if quick else 200
    judge = JudgeConfig(**QUICK_JUDGE) if quick else None
    for split in ("test", "heldout"):
        results[split] = evaluate_bundle(
            bundle, split, bundle_dir / "judge", num_captions=n, params=sampling,
            grid_path=out / f"eval_{split}.png", judge_config=judge,
        )  # fmt: skip
        write_json(results[split], out / f"eval_{split}.json")
    timings["evaluate_s"] = time.perf_counter() - start
    table, plot = compare([runs / "shapes-tokenizer", runs / "shapes-transformer"], out / "compare")

    summary = {
        "bundle": str(bundle_dir),
        "samples": str(out / "samples.png"),
        "evaluation": {s: str(out / f"eval_{s}.json") for s in results},
        "compare": [str(table), str(plot)],
        "runs": str(runs),
        "caption_fidelity": {s: r["caption_fidelity"] for s, r in results.items()},
        "judge_accuracy_real": {s: r["judge_accuracy_real"] for s, r in results.items()},
        "tokenizer_psnr_test": results["test"]["tokenizer_psnr"],
        "seconds": {k: round(v, 1) for k, v in timings.items()},
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print("\n=== unimodal demo: done ===")
    print(json.dumps(summary, indent=2))
    prompt = "a large red circle at the top left"
    print(f"sample again: unimodal sample --bundle {bundle_dir} --prompt '{prompt}' --out grid.png")
    if wandb != "disabled":
        print(f"W&B runs (offline unless logged in) are in {runs}/*/wandb; upload later with `wandb sync`.")
    return summary
