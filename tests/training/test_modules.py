"""The LightningModules: the adversarial path updates generator and discriminator; a compiled training
forward computes what the eager one does and saves the same state dict."""

from functools import partial

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from unimodal.bench.train import synthetic_batches
from unimodal.lm.transformer import TransformerConfig
from unimodal.lm.vocab import JointVocab
from unimodal.tokenizers.image import ImageTokenizerConfig
from unimodal.training.modules import TokenizerModule, TransformerModule

SMALL = ImageTokenizerConfig(resolution=16, channels=8, channel_mult=[2, 4], code_dim=16, codebook_size=32)


def test_adversarial_training_updates_generator_and_discriminator():
    torch.manual_seed(0)
    module = TokenizerModule(SMALL, adversarial_weight=0.5, adversarial_start=1, warmup_steps=1)
    disc_before = [p.clone() for p in module.discriminator.parameters()]
    images = torch.rand(32, 3, 16, 16) * 2 - 1
    trainer = L.Trainer(max_steps=3, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0)  # fmt: skip
    trainer.fit(module, DataLoader(images, batch_size=8))
    assert trainer.global_step == 3  # one optimizer step per batch, GAN or not
    assert any(not torch.equal(a, b) for a, b in zip(disc_before, module.discriminator.parameters()))
    assert "train/d_loss" in trainer.callback_metrics and "train/adv_weight" in trainer.callback_metrics


@pytest.mark.slow
def test_compiled_training_forward_matches_eager_and_keeps_the_state_dict(monkeypatch):
    """`model.compile: true` changes how the loss runs, not what it computes or what is saved. The graph is
    captured by dynamo and AOT autograd as in a real run; inductor's code generation (tens of seconds on a
    CPU) is left out."""
    monkeypatch.setattr(torch, "compile", partial(torch.compile, backend="aot_eager"))
    vocab = JointVocab(text_size=64, image_size=16, image_grid=(2, 2), max_text_tokens=8)
    config = TransformerConfig(n_layers=1, d_model=32, n_heads=2, ffn_hidden=64)
    batch = synthetic_batches(vocab, 2, 5, 1)[0]
    losses, grads = [], []
    for compile in (False, True):
        torch.manual_seed(0)
        module = TransformerModule(vocab=vocab, model=config, compile=compile)
        loss, _ = module._loss(batch)
        loss.backward()
        losses.append(loss.detach())
        grads.append(torch.cat([p.grad.flatten() for p in module.model.parameters()]))
        keys = list(module.state_dict())
        assert keys == [f"model.{k}" for k in module.model.state_dict()]  # no compiled copy saved
    assert module._compiled is not None and module._model() is module._compiled[1]  # the compiled twin ran
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-6)
