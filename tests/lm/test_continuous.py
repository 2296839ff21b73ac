"""The transformer over continuous image tokens: latents enter as input embeddings at the slots, the loss
mixes text cross-entropy and the diffusion loss, the cached sampling loop sees the hidden states a full
forward pass computes, the parts save and load, and a short training run learns text-dependent latents."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from unimodal.generation.continuous import generate_latents, guidance_at
from unimodal.generation.sampling import SamplingParams
from unimodal.lm.continuous import LatentHead, continuous_loss, hidden_and_logits, slot_grid
from unimodal.lm.diffloss import DiffLossConfig
from unimodal.lm.grammar import SegmentGrammar
from unimodal.lm.transformer import TransformerConfig, build_transformer
from unimodal.lm.vocab import JointVocab

VOCAB = JointVocab(text_size=12, image_size=1, image_grid=(2, 3), max_text_tokens=4)
C = 4


def tiny(process: str = "flow", seed: int = 0):
    torch.manual_seed(seed)
    backbone = build_transformer(TransformerConfig(n_layers=2, d_model=32, n_heads=2, ffn_hidden=64), VOCAB)
    head = LatentHead(DiffLossConfig(token_dim=C, cond_dim=32, width=32, depth=2, process=process, sample_steps=8))
    return backbone, head


def batch_of(texts: list[list[int]], latents: torch.Tensor) -> dict[str, torch.Tensor]:
    rows = [VOCAB.text_to_image_sequence(t, slot_grid(VOCAB)) for t in texts]
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), VOCAB.pad)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):  # right padding, as training batches have
        ids[i, : len(r)], mask[i, : len(r)] = torch.tensor(r), 1
    return {"input_ids": ids, "attention_mask": mask, "latents": latents}


def test_the_vocabulary_has_one_slot_id():
    assert slot_grid(VOCAB).shape == (2, 3)
    with pytest.raises(ValueError, match="image_size 1"):
        slot_grid(JointVocab(text_size=12, image_size=8, image_grid=(2, 3)))


def test_latents_replace_the_slot_embeddings_and_both_losses_train_everything():
    backbone, head = tiny()
    for p in head.parameters():  # off the zero start, so every part gets a gradient
        torch.nn.init.normal_(p, std=0.1)
    batch = batch_of([[1, 2], [3]], torch.randn(2, 6, C))
    hidden, logits = hidden_and_logits(backbone, head, VOCAB, batch["input_ids"], batch["attention_mask"],
                                       batch["latents"])  # fmt: skip
    other = dict(batch, latents=batch["latents"] + 1)
    hidden2, _ = hidden_and_logits(backbone, head, VOCAB, other["input_ids"], other["attention_mask"], other["latents"])
    first_slot = 1 + 2 + 1  # <bos> t t <boi>: row 0's first latent
    assert torch.equal(hidden[0, :first_slot], hidden2[0, :first_slot])  # causal: the past ignores the latents
    assert not torch.allclose(hidden[0, first_slot:], hidden2[0, first_slot:])
    loss, parts = continuous_loss(backbone, head, VOCAB, SegmentGrammar(VOCAB), batch, {"text": 1.0, "image": 3.0})
    assert torch.isfinite(loss) and torch.isclose(loss, (parts["text"] + 3 * parts["image"]) / 4)
    loss.backward()
    for name, module in (("latent_in", head.latent_in), ("diffloss", head.diffloss), ("backbone", backbone)):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters()), name


@pytest.mark.parametrize("cfg_scale", [1.0, 2.5])
def test_cached_sampling_sees_the_full_forward_hidden_states(cfg_scale):
    """Replaying each step's draw on the hidden states of one uncached forward pass over the prompt and the
    sampled latents gives the same latents: the KV cache, left padding and positions are right."""
    backbone, head = tiny("flow")
    for p in head.parameters():
        torch.nn.init.normal_(p, std=0.1)
    backbone.eval(), head.eval()
    prompts = [VOCAB.prompt([1, 2, 3]), VOCAB.prompt([4])]  # different lengths: left padding
    params = SamplingParams(cfg_scale=cfg_scale)
    latents = generate_latents(backbone, head, VOCAB, prompts, params, "linear", torch.Generator().manual_seed(5))
    assert latents.shape == (2, 2, 3, C)
    flat = latents.flatten(1, 2)  # (B, N, C)
    batches = [batch_of([[1, 2, 3], [4]], flat)]
    if cfg_scale != 1:
        batches.append(batch_of([[], []], flat))  # the unconditional twins: `<bos> <boi>`, the empty caption
    zs = []
    for b in batches:
        hidden, _ = hidden_and_logits(backbone, head, VOCAB, b["input_ids"], b["attention_mask"], b["latents"])
        slots = VOCAB.is_image(b["input_ids"][:, 1:])
        zs.append(hidden[:, :-1][slots].view(2, 6, -1))  # the hidden state before each latent
    g = torch.Generator().manual_seed(5)
    for k in range(6):
        if cfg_scale == 1:
            x = head.diffloss.sample(zs[0][:, k], generator=g)
        else:
            scale = guidance_at(k, 6, cfg_scale, "linear")
            x = head.diffloss.sample(zs[0][:, k], cfg_scale=scale, z_uncond=zs[1][:, k], generator=g)
        torch.testing.assert_close(x, flat[:, k], atol=1e-4, rtol=1e-4)


def test_linear_guidance_ramps_to_the_scale():
    assert [guidance_at(k, 4, 3.0, "linear") for k in range(4)] == [1.5, 2.0, 2.5, 3.0]
    assert guidance_at(0, 4, 3.0, "constant") == 3.0


def test_sampling_refuses_prompts_not_at_the_image():
    backbone, head = tiny()
    with pytest.raises(ValueError, match="<boi>"):
        generate_latents(backbone, head, VOCAB, [[VOCAB.bos, 1]], SamplingParams())


def test_saved_parts_load_and_sample_identically(tmp_path):
    backbone, head = tiny("ddpm")
    for p in head.parameters():
        torch.nn.init.normal_(p, std=0.1)
    backbone.eval(), head.eval()
    backbone.save_pretrained(tmp_path / "transformer", safe_serialization=True)
    head.save_pretrained(tmp_path / "image_head")
    backbone2 = AutoModelForCausalLM.from_pretrained(tmp_path / "transformer", use_safetensors=True).eval()
    head2 = LatentHead.from_pretrained(tmp_path / "image_head")
    prompts, params = [VOCAB.prompt([1, 2])], SamplingParams(cfg_scale=2.0)
    a = generate_latents(backbone, head, VOCAB, prompts, params, generator=torch.Generator().manual_seed(1))
    b = generate_latents(backbone2, head2, VOCAB, prompts, params, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)


def test_a_short_fit_makes_latents_follow_the_text():
    """Text id 1 asks for latents near +1, text id 2 for latents near -1, the latents' sign alternating
    along the raster: after 150 steps, sampled latents have the right sign at every position. (Flow
    matching: a DDPM head learns this choice of mode more slowly, its noise loss weighs the noisy
    steps that decide it little; the head's tests cover DDPM's mode weights.)"""
    backbone, head = tiny("flow")
    params = list(backbone.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=3e-3, weight_decay=0.0)
    pattern = torch.tensor([1.0, -1.0, 1.0, -1.0, 1.0, -1.0])[None, :, None]  # (1, N, 1)
    grammar = SegmentGrammar(VOCAB)
    g = torch.Generator().manual_seed(0)
    for _ in range(150):
        sign = torch.randint(0, 2, (16,), generator=g) * 2 - 1  # (B,)
        latents = sign[:, None, None] * pattern + 0.1 * torch.randn(16, 6, C, generator=g)
        batch = batch_of([[1] if s > 0 else [2] for s in sign.tolist()], latents)
        loss, _ = continuous_loss(backbone, head, VOCAB, grammar, batch, {"text": 1.0, "image": 1.0})
        opt.zero_grad()
        loss.backward()
        opt.step()
    backbone.eval(), head.eval()
    prompts = [VOCAB.prompt([1])] * 8 + [VOCAB.prompt([2])] * 8
    out = generate_latents(backbone, head, VOCAB, prompts, SamplingParams(), generator=torch.Generator().manual_seed(0))
    means = out.flatten(1, 2).mean(-1)  # (16, N)
    expected = torch.cat([pattern.view(1, 6).expand(8, 6), -pattern.view(1, 6).expand(8, 6)])
    assert (means.sign() == expected).float().mean() > 0.95, means
