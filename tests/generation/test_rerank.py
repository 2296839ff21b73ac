"""Reranking: the contrastive scorer is trained once per config and keeps the best-scored candidates."""

import pytest
import torch

from unimodal.generation.rerank import ContrastiveScorer, RerankerConfig, load_or_train_reranker, rerank


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
