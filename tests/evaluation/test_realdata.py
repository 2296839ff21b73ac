"""Real-data evaluation: the distances against their closed forms, the ranking metric, the feature network on
data it can learn, and the whole evaluation of a bundle on the folder it records."""

import json
import math
from dataclasses import replace

import pytest
import torch
from PIL import Image

from unimodal.data.pairs import DataSource, load_pairs, readable_images
from unimodal.evaluation.features import FeatureNetConfig, train_feature_net
from unimodal.evaluation.realdata import (
    data_of,
    evaluate_real,
    frechet_distance,
    kernel_inception_distance,
    label_columns,
    recall_at,
)
from unimodal.generation.sampling import SamplingParams

COLOURS = {"red": (230, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 230), "yellow": (240, 220, 20)}
STYLES = ("disc", "bar")


def test_frechet_distance_matches_the_closed_form_for_diagonal_gaussians():
    g = torch.Generator().manual_seed(0)
    n, d = 20000, 4
    sa, sb = torch.tensor([1.0, 2.0, 0.5, 1.0]), torch.tensor([1.5, 1.0, 0.5, 3.0])
    mu = torch.tensor([1.0, 0.0, -2.0, 0.5])
    a = torch.randn(n, d, generator=g) * sa
    b = torch.randn(n, d, generator=g) * sb + mu
    expected = float(mu.square().sum() + (sa**2 + sb**2 - 2 * sa * sb).sum())
    assert frechet_distance(a, b) == pytest.approx(expected, rel=0.05)
    assert abs(frechet_distance(a, a)) < 1e-6


def test_kid_is_near_zero_for_one_distribution_and_positive_for_two():
    g = torch.Generator().manual_seed(1)
    a, b, c = torch.randn(400, 8, generator=g), torch.randn(400, 8, generator=g), torch.randn(400, 8, generator=g) + 1
    same, other = kernel_inception_distance(a, b), kernel_inception_distance(a, c)
    assert abs(same) < 0.05 and other > 10 * max(abs(same), 1e-3)


def test_recall_at_counts_captions_ranked_above_the_own_one():
    sim = torch.tensor([[0.9, 0.1, 0.0], [0.5, 0.4, 0.3], [0.1, 0.2, 0.3]])
    own = torch.tensor([0, 1, 0])  # ranks 0, 1, 2
    assert recall_at(sim, own, ks=(1, 2, 3)) == pytest.approx({"r@1": 1 / 3, "r@2": 2 / 3, "r@3": 1.0})


def _picture(colour: str, style: str, size: int = 32) -> Image.Image:
    im = Image.new("RGBA", (size, size), (0, 0, 0, 0))
    for x in range(size):
        for y in range(size):
            disc = (x - size / 2) ** 2 + (y - size / 2) ** 2 < (size / 3) ** 2
            if disc if style == "disc" else size // 3 <= y < 2 * size // 3:
                im.putpixel((x, y), (*COLOURS[colour], 255))
    return im


def _folder(root, held_out=(("yellow", "bar"), ("red", "disc")), copies=6):
    """colour x style pictures on transparency, captions '<colour> <style>', labels colour and style; the
    held-out pairs only in test/."""
    for split in ("train", "test"):
        (root / split).mkdir(parents=True)
    rows = {"train": [], "test": []}
    for colour in COLOURS:
        for style in STYLES:
            split = "test" if (colour, style) in held_out else "train"
            for i in range(copies if split == "train" else 3):
                name = f"{colour}_{style}_{i}.png"
                _picture(colour, style).rotate(7 * i).save(root / split / name)
                rows[split].append(
                    {"file_name": name, "caption": f"{colour} {style}", "colour": colour, "style": style}
                )
    for split, r in rows.items():
        (root / split / "metadata.jsonl").write_text("\n".join(json.dumps(x) for x in r))
    return root


def test_feature_net_learns_captions_and_labels_of_its_training_pairs(tmp_path):
    ds = load_pairs(DataSource(name=str(_folder(tmp_path / "d"))), "train")
    assert label_columns(ds) == ["colour", "style"]
    images, _ = readable_images(ds, 32, "white")
    captions, labels = ds["text"], {k: ds[k] for k in ("colour", "style")}
    net = train_feature_net(FeatureNetConfig.for_data(captions, labels, 32, steps=150, channels=16), images,
                            captions, labels)  # fmt: skip
    candidates = sorted(set(captions))
    own = torch.tensor([candidates.index(c) for c in captions])
    feats = net.embed(images)
    assert recall_at(net.similarity(feats, candidates), own)["r@1"] > 0.9
    predicted = net.classify(feats)
    assert all(sum(p == t for p, t in zip(predicted[k], labels[k])) / len(captions) > 0.9 for k in labels)


def test_evaluation_uses_the_bundles_own_data_and_refuses_other_data(bundle, tmp_path):
    folder = _folder(tmp_path / "pics")
    trained_on = replace(bundle, data=DataSource(name=str(folder)).to_dict())
    assert data_of(trained_on, None).name == str(folder.resolve())
    assert data_of(trained_on, str(folder)).name == str(folder.resolve())
    with pytest.raises(ValueError, match="was trained on"):
        data_of(trained_on, "shapes")
    with pytest.raises(ValueError, match="pass --data"):
        data_of(replace(bundle, data=None), None)


def test_evaluate_real_reports_each_metric_beside_its_ceiling_and_floor(bundle, tmp_path):
    folder = _folder(tmp_path / "pics")
    source = DataSource(name=str(folder))
    params = SamplingParams(batch_size=8, seed=0)
    features = {"steps": 30, "channels": 8}
    run = lambda: evaluate_real(bundle, source, "test", tmp_path / "features", 8, params, features=features)  # noqa: E731
    result = run()
    assert set(result["frechet_distance"]) == {"generated", "reconstructed", "real_train"}
    assert all(math.isfinite(v) for v in [*result["frechet_distance"].values(), *result["kid"].values()])
    agreement = result["prompt_agreement"]
    assert agreement["candidates"] == 2 and set(agreement) == {"generated", "real", "random_train", "candidates"}
    assert set(result["attribute_accuracy"]) == {"colour", "style"}
    assert set(result["attribute_accuracy"]["style"]) == {"generated", "real", "real_train"}
    assert 0 <= result["tokenizer"]["codebook_usage"] <= 1 and result["num_captions"] == 6
    assert run() == result  # deterministic for a seed, the cached features included


def test_evaluate_real_with_reranking_reports_the_first_candidates_beside(bundle, tmp_path):
    source = DataSource(name=str(_folder(tmp_path / "pics")))
    result = evaluate_real(bundle, source, "test", tmp_path / "features", 4, SamplingParams(batch_size=8), rerank=2,
                           features={"steps": 5}, reranker={"dim": 16, "min_steps": 5})  # fmt: skip
    assert result["rerank_candidates"] == 2 and (tmp_path / "reranker" / "model.safetensors").is_file()
    for metric in (result["frechet_distance"], result["kid"], result["prompt_agreement"],
                   result["attribute_accuracy"]["colour"]):  # fmt: skip
        assert {"generated", "generated_without_rerank"} <= set(metric)
    with pytest.raises(ValueError, match="rerank must be"):
        evaluate_real(bundle, source, "test", tmp_path / "features", 4, rerank=0)


def test_evaluate_real_scores_a_bundle_of_continuous_tokens(tmp_path):
    """Continuous latents have no codebook: the tokenizer's usage is left out, everything else is scored."""
    from tests.generation.test_continuous import continuous_bundle

    result = evaluate_real(continuous_bundle("flow"), DataSource(name=str(_folder(tmp_path / "pics"))), "test",
                           tmp_path / "features", 4, SamplingParams(batch_size=4), features={"steps": 5})  # fmt: skip
    assert result["tokenizer"]["codebook_usage"] is None and math.isfinite(result["tokenizer"]["psnr"])
    assert math.isfinite(result["frechet_distance"]["generated"]) and result["num_captions"] == 4
