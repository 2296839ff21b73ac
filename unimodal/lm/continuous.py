"""The transformer over continuous image tokens (MAR's raster-order autoregression).

The joint sequence keeps its layout, `<bos> text <boi> slot x N <eoi> <eos>`, with a vocabulary of
one image id (`image_size=1`): the slot that marks where a latent vector stands. The grammar, the
text and special ids and their LM head are unchanged; only the image positions differ:

    input at a slot      latent_in(latent) (B, N, C) -> (B, N, d) instead of the slot's embedding
    target at a slot     the next latent, through the diffusion head conditioned on the hidden state
                         of the position before it (the LM head's answer there, the slot, is certain)

    backbone  a `transformers` LlamaForCausalLM (`build_transformer`), run with `inputs_embeds`:
              `AutoModelForCausalLM.from_pretrained(bundle/transformer)` loads it with no project code
    head      `LatentHead`: latent_in and the `DiffLoss` head; `image_head/config.json + model.safetensors`
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from unimodal.lm.diffloss import DiffLoss, DiffLossConfig
from unimodal.lm.grammar import SegmentGrammar
from unimodal.lm.transformer import sequence_loss
from unimodal.lm.vocab import JointVocab
from unimodal.weights import CONFIG_FILE, WEIGHTS_FILE, write_folder


def slot_grid(vocab: JointVocab) -> torch.Tensor:
    """The image's code grid in a continuous vocabulary: every position holds the one slot code 0."""
    if vocab.image_size != 1:
        raise ValueError(f"a continuous-token vocabulary has image_size 1 (the slot), got {vocab.image_size}")
    return torch.zeros(vocab.image_grid, dtype=torch.long)


class LatentHead(nn.Module):
    """What the continuous model adds to the backbone: latents in (a linear projection into the
    input embeddings) and latents out (the diffusion head)."""

    def __init__(self, config: DiffLossConfig):
        super().__init__()
        self.config = config
        self.latent_in = nn.Linear(config.token_dim, config.cond_dim)
        self.diffloss = DiffLoss(config)

    def embed(self, embeds: torch.Tensor, slots: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        """Token embeddings (B, T, d) with the slots (B, T) bool replaced by latent_in(latents (B, N, C)),
        in raster order; every row has N slots."""
        return embeds.masked_scatter(slots[..., None], self.latent_in(latents).to(embeds.dtype))

    def save_pretrained(self, directory: str | Path) -> Path:
        return write_folder(directory, asdict(self.config), self.state_dict())

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> LatentHead:
        directory = Path(directory)
        for name in (CONFIG_FILE, WEIGHTS_FILE):
            if not (directory / name).is_file():
                raise FileNotFoundError(f"{directory} is not a latent head folder (missing {name})")
        head = cls(DiffLossConfig(**json.loads((directory / CONFIG_FILE).read_text())))
        head.load_state_dict(load_file(str(directory / WEIGHTS_FILE)))
        return head.eval()


def hidden_and_logits(backbone, head: LatentHead, vocab: JointVocab, ids, attention_mask, latents):
    """ids (B, T) with N slots per row, latents (B, N, C) -> last hidden states (B, T, d), logits (B, T, V)."""
    embeds = head.embed(backbone.get_input_embeddings()(ids), vocab.is_image(ids), latents)
    hidden = backbone.get_decoder()(inputs_embeds=embeds, attention_mask=attention_mask).last_hidden_state
    return hidden, backbone.get_output_embeddings()(hidden)


def latent_conditions(backbone, head: LatentHead, vocab: JointVocab, ids, attention_mask, latents):
    """The hidden state that predicts each latent, z (B*N, d) in raster order per row (the position before
    each slot), and the logits (B, T, V) for the text and special ids."""
    hidden, logits = hidden_and_logits(backbone, head, vocab, ids, attention_mask, latents)
    return hidden[:, :-1][vocab.is_image(ids[:, 1:])], logits


def continuous_loss(
    backbone,
    head: LatentHead,
    vocab: JointVocab,
    grammar: SegmentGrammar,
    batch: dict[str, torch.Tensor],
    weights: dict[str, float],
    mask_by_grammar: bool = True,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The mix of the two segments' losses, as `sequence_loss` mixes them: text (every target that is not a
    slot, by cross-entropy) and image (every latent, by the diffusion loss).

    batch: input_ids (B, T), attention_mask (B, T), latents (B, N, C). Returns the loss and its parts."""
    ids, mask, latents = batch["input_ids"], batch["attention_mask"], batch["latents"]
    z, logits = latent_conditions(backbone, head, vocab, ids, mask, latents)
    text, _ = sequence_loss(logits, ids, mask, grammar, {"text": 1.0}, mask_by_grammar)
    image = head.diffloss.loss(latents.flatten(0, 1).to(z.dtype), z)
    w_text, w_image = weights.get("text", 1.0), weights.get("image", 1.0)
    total = (w_text * text + w_image * image) / max(w_text + w_image, 1e-8)
    return total, {"text": text.detach(), "image": image.detach()}
