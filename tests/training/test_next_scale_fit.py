"""Stage 2 over multi-scale codes: the module's loss is the grammar-masked loss of the block-causal forward
(with each scale's loss at validation), and both stages fit with `quantizer: multiscale` end to end (the
export samples next-scale images)."""

import pytest
import torch

from unimodal.evaluation.compare import read_curves
from unimodal.generation.bundle import Bundle
from unimodal.generation.sampling import SamplingParams
from unimodal.lm import next_scale
from unimodal.lm.transformer import TransformerConfig, sequence_loss
from unimodal.lm.vocab import JointVocab
from unimodal.training.modules import TransformerModule

VOCAB = JointVocab(text_size=50, image_size=20, image_grid=(4, 4), max_text_tokens=5, image_scales=(1, 2, 4))


def test_module_loss_is_the_block_causal_loss():
    module = TransformerModule(VOCAB, TransformerConfig(n_layers=1, d_model=32, n_heads=4, ffn_hidden=64))
    torch.manual_seed(0)
    rows = [VOCAB.text_to_image_sequence(t, torch.randint(0, 20, (21,))) for t in ([1, 2, 3], [4])]
    ids = torch.full((2, len(rows[0])), VOCAB.pad)
    att = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, : len(r)], att[i, : len(r)] = torch.tensor(r), 1
    loss, _ = module._loss({"input_ids": ids, "attention_mask": att})
    logits = next_scale.forward(module.model, VOCAB, ids, att).logits
    expected, _ = sequence_loss(logits, ids, att, module.grammar, module.loss_weights, True)
    plain = module.model(input_ids=ids, attention_mask=att).logits
    raster, _ = sequence_loss(plain, ids, att, module.grammar, module.loss_weights, True)
    assert torch.allclose(loss, expected) and not torch.allclose(loss, raster)
    module.eval()  # validation adds each scale's loss; together they are the image loss
    _, parts = module._loss({"input_ids": ids, "attention_mask": att})
    scales = [parts[f"image_s{k}"] for k in range(3)]
    assert [n for _, n in scales] == [2 * 1, 2 * 4, 2 * 16]
    assert torch.isclose(sum(s for s, _ in scales), parts["image"][0], rtol=1e-5)


@pytest.mark.slow
def test_both_stages_fit_with_multiscale_codes(tmp_path, hf_cache):
    from tests.conftest import SMALL_BATCH, fit_tokenizer, fit_transformer

    extra = ["--model.model.quantizer", "multiscale", "--model.model.scales", "[1, 2, 4, 8]", *SMALL_BATCH]
    tokenizer = fit_tokenizer(tmp_path, hf_cache, steps=20, name="ms", extra=extra)
    dropout = ["--data.caption_dropout", "0.1", *SMALL_BATCH]
    export = fit_transformer(tmp_path, hf_cache, tokenizer, steps=40, extra=dropout)
    bundle = Bundle.load(export)
    assert bundle.vocab.image_scales == (1, 2, 4, 8) and bundle.vocab.image_tokens == 85
    images = bundle.generate(["a red circle at the top left"], SamplingParams(cfg_scale=2.0, top_k=50))
    assert images.shape == (1, 3, 32, 32)
    curve = read_curves(tmp_path / "lm" / "csv" / "metrics.csv")["train/loss"]
    assert curve[-1][1] < curve[0][1] * 0.9  # 0.69 here
    assert {"val/loss_image_s0", "val/loss_image_s3"} <= set(read_curves(tmp_path / "lm" / "csv" / "metrics.csv"))
    assert list((tmp_path / "lm" / "samples").glob("samples_step*.png")), "no sample grid written at validation"
