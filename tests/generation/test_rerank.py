"""Reranking: the contrastive scorer is trained once per config on the bundle's own data and keeps the
best-scored candidates."""

import json
from dataclasses import replace

import pytest
import torch

from tests.evaluation.test_realdata import _folder
from unimodal.data.pairs import DataSource, load_pairs, readable_images
from unimodal.generation.rerank import (
    ContrastiveScorer,
    RerankerConfig,
    load_or_train_reranker,
    rerank,
    reranker_for,
    training_pairs,
)


def test_rerank_keeps_the_best_scored_candidates(tmp_path, bundle):
    config = RerankerConfig(text_size=bundle.vocab.text_size, train_pairs=256, epochs=1, batch_size=64, dim=32)
    scorer = load_or_train_reranker(tmp_path, config, bundle.text_tokenizer)
    again = load_or_train_reranker(tmp_path, config, bundle.text_tokenizer)  # cached: same weights
    assert all(torch.equal(p, q) for p, q in zip(scorer.state_dict().values(), again.state_dict().values()))
    images = torch.rand(2 * 4, 3, 32, 32) * 2 - 1
    ids = bundle.text_tokenizer.encode_batch(["a red circle at the top left", "blue square, bottom right"])
    kept, best = rerank(scorer, images, ids, candidates=4, keep=2)
    scores = scorer.score(images, [i for i in ids for _ in range(4)]).view(2, 4)
    assert kept.shape == (4, 3, 32, 32) and torch.equal(best, scores.topk(2, dim=1).indices)
    assert torch.equal(kept[0], images[best[0, 0]]) and torch.equal(kept[2], images[4 + best[1, 0]])
    with pytest.raises(ValueError, match="keep must be in"):
        rerank(scorer, images, ids, candidates=4, keep=5)
    assert isinstance(scorer, ContrastiveScorer)


def test_the_scorer_of_a_bundle_trained_on_a_folder_learns_that_folders_pairs(tmp_path, bundle):
    """A bundle that records a folder gets a scorer trained on the folder's training pairs (not on shapes): it
    ranks each training picture's own caption first."""
    folder = _folder(tmp_path / "pics")
    trained_on = replace(bundle, data=DataSource(name=str(folder)).to_dict())
    scorer = reranker_for(trained_on, tmp_path / "reranker", dim=32, min_steps=60, batch_size=36)
    assert scorer.config.data["name"] == str(folder.resolve())
    assert reranker_for(bundle, tmp_path / "shapes", train_pairs=64, epochs=1).config.data is None
    train = load_pairs(DataSource(name=str(folder)), "train")
    images, _ = readable_images(train, 32)
    captions = sorted(set(train["text"]))
    ids = trained_on.text_tokenizer.encode_batch(captions)
    scores = torch.stack([scorer.score(images, [c] * len(images)) for c in ids], 1)  # (images, captions)
    own = torch.tensor([captions.index(t) for t in train["text"]])
    assert (scores.argmax(1) == own).float().mean() > 0.8


def test_a_folder_without_readable_captioned_pictures_is_refused_in_one_line(tmp_path):
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "a.png").write_bytes(b"not a picture")
    (tmp_path / "train" / "metadata.jsonl").write_text(json.dumps({"file_name": "a.png", "caption": "red disc"}))
    with pytest.raises(ValueError, match="no readable captioned training pairs"):
        training_pairs(RerankerConfig(data=DataSource(name=str(tmp_path)).to_dict()))
