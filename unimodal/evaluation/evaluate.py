"""Evaluation of a bundle on the built-in shapes splits.

- judge accuracy: the judge (trained on ground truth only) reading real images of the split;
- caption fidelity: fraction of images generated from the split's captions whose judged scene
  matches the caption (colour, shape and position of every object), plus per-attribute rates;
- image tokenizer: PSNR of reconstructions and codebook usage over the split's real images, and the
  judge's scene accuracy on those reconstructions: the fidelity ceiling, since generated images can only
  be as legible as the tokenizer's decoder makes them;
- caption dependence: the teacher-forced image loss with the split's own captions against shuffled
  ones (`conditioning.py`), which shows whether the model reads the text without sampling.

With `rerank=N > 1`, N candidates are generated per caption and the contrastive scorer of
`rerank.py` keeps the best one; the fidelity of each caption's first candidate (what sampling
without reranking gives, same seeds) is reported next to it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from unimodal.data.images import images_to_tensor
from unimodal.data.pairs import DataSource, load_pairs
from unimodal.data.shapes import ShapesConfig
from unimodal.evaluation.conditioning import caption_dependence
from unimodal.evaluation.judge import JudgeConfig, load_or_train_judge, scene_labels, scene_match
from unimodal.evaluation.reconstruct import reconstruct
from unimodal.generation.bundle import Bundle
from unimodal.generation.rerank import rerank as keep_best
from unimodal.generation.rerank import reranker_for, sample_candidates
from unimodal.generation.sampling import SamplingParams
from unimodal.tokenizers.image import psnr, token_statistics
from unimodal.viz import make_grid

SPLITS = ("test", "heldout")


def _rates(matches: dict[str, torch.Tensor]) -> dict[str, float]:
    return {k: float(v.float().mean()) for k, v in matches.items()}


def evaluate_bundle(
    bundle: Bundle,
    split: str,
    judge_dir: str | Path,
    num_captions: int = 200,
    params: SamplingParams | None = None,
    shapes: ShapesConfig | None = None,
    grid_path: str | Path | None = None,
    judge_config: JudgeConfig | None = None,
    rerank: int = 1,
    reranker_dir: str | Path | None = None,
    reranker_train_pairs: int | None = None,
    details: dict | None = None,
) -> dict:
    """Metrics of one split as a JSON-friendly dict. Pass `details={}` to also get, per caption, the
    caption, the generated image and the judge's reading (`captions`, `images`, `judged`, `match`)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    resolution = bundle.image_tokenizer.config.resolution
    shapes = shapes or ShapesConfig(resolution=resolution)
    if shapes.resolution != resolution:
        raise ValueError(f"shapes resolution {shapes.resolution} != image tokenizer resolution {resolution}")
    params = params or SamplingParams()
    ds = load_pairs(DataSource(name="shapes", shapes=shapes), split)
    ds = ds.select(range(min(num_captions, len(ds))))
    rows = [ds[i] for i in range(len(ds))]
    labels = scene_labels(rows)
    real = images_to_tensor([r["image"] for r in rows], resolution)

    judge_config = judge_config or JudgeConfig(resolution=resolution, background=shapes.background)
    judge = load_or_train_judge(judge_dir, judge_config)
    judge_real = _rates(scene_match(judge.read(real), labels))

    tok = bundle.image_tokenizer
    codes, recon = reconstruct(tok, real, params.decoder, params.seed)
    code_stats = token_statistics(tok, codes)

    if rerank < 1:
        raise ValueError(f"rerank must be >= 1 candidates per caption, got {rerank}")
    captions = [r["text"] for r in rows]
    generated = sample_candidates(bundle, captions, params, rerank, f"generating {split}")  # (P * rerank, ...)
    extra = {}
    if rerank > 1:
        overrides = {"train_pairs": reranker_train_pairs} if reranker_train_pairs else {}
        scorer = reranker_for(bundle, reranker_dir or Path(judge_dir).parent / "reranker", **overrides)
        first = generated[::rerank]
        generated, _ = keep_best(scorer, generated, bundle.text_tokenizer.encode_batch(captions), rerank)
        extra = {"rerank_candidates": rerank, "caption_fidelity_without_rerank": _rates(
            scene_match(judge.read(first), labels))["scene"]}  # fmt: skip
    judged = judge.read(generated)
    matches = scene_match(judged, labels)
    fidelity = _rates(matches)
    if details is not None:
        details.update(captions=captions, images=generated, judged=judged, match=matches["scene"])
    if grid_path:
        make_grid(generated[:32], captions[:32], ncol=8).save(grid_path)

    return {
        "split": split,
        "num_captions": len(rows),
        "caption_fidelity": fidelity["scene"],
        "fidelity_by_attribute": {k: v for k, v in fidelity.items() if k != "scene"},
        **extra,
        "judge_accuracy_real": judge_real["scene"],
        "judge_by_attribute_real": {k: v for k, v in judge_real.items() if k != "scene"},
        "tokenizer_psnr": float(psnr(recon, real).mean()),
        "tokenizer_judge_accuracy": _rates(scene_match(judge.read(recon), labels))["scene"],
        "tokenizer_codebook_usage": code_stats.get("codebook_usage"),
        "tokenizer_perplexity": code_stats.get("perplexity"),
        "caption_dependence": caption_dependence(bundle, real, captions, seed=params.seed),
        "sampling": {
            k: v for k, v in params.__dict__.items() if k in ("temperature", "top_k", "top_p", "seed", "cfg_scale")
        },
    }


def write_json(result: dict, path: str | Path):
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(result, indent=2))
