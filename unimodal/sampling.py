"""Text-to-image sampling with `model.generate()` and the grammar as a LogitsProcessor.

Functions take the plain modules (transformer, vocab, tokenizers) and return tensors; no
Lightning involved. Every sample is a full image: the grammar forces exactly N image codes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from PIL import Image, ImageDraw, ImageFont
from transformers import LogitsProcessorList

from .data import tensor_to_image
from .grammar import GrammarLogitsProcessor, SegmentGrammar


@dataclass
class SamplingParams:
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    greedy: bool = False
    seed: int = 0
    images_per_prompt: int = 1
    batch_size: int = 64
    use_cache: bool = True

    def __post_init__(self):
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0 (got {self.temperature}); use greedy for argmax decoding")
        if self.top_k is not None and self.top_k <= 0:
            raise ValueError(f"top_k must be a positive integer (got {self.top_k}); leave it unset to disable")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1] (got {self.top_p})")
        if self.images_per_prompt < 1 or self.batch_size < 1:
            raise ValueError("images_per_prompt and batch_size must be >= 1")


def left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad prompts for a decoder-only model: (B, L) ids and attention mask."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = torch.tensor(r)
        mask[i, width - len(r) :] = 1
    return ids, mask


@torch.no_grad()
def generate_codes(model, vocab, prompt_ids: list[list[int]], params: SamplingParams) -> torch.Tensor:
    """Joint-id prompts (each `<bos> text <boi>`) -> code grids (B, h, w)."""
    device = next(model.parameters()).device
    grammar = SegmentGrammar(vocab)
    ids, mask = left_pad(prompt_ids, vocab.pad)
    out = model.generate(
        input_ids=ids.to(device),
        attention_mask=mask.to(device),
        max_new_tokens=vocab.image_tokens + 2,
        do_sample=not params.greedy,
        temperature=None if params.greedy else params.temperature,
        top_k=None if params.greedy else params.top_k,
        top_p=None if params.greedy else params.top_p,
        logits_processor=LogitsProcessorList([GrammarLogitsProcessor(grammar)]),
        pad_token_id=vocab.pad,
        bos_token_id=vocab.bos,
        eos_token_id=vocab.eos,
        use_cache=params.use_cache,
    )
    image_ids = out[:, ids.shape[1] : ids.shape[1] + vocab.image_tokens].cpu()  # (B, N)
    return vocab.ids_to_codes(image_ids)


@torch.no_grad()
def generate_images(model, vocab, text_tokenizer, image_tokenizer, prompts: list[str], params: SamplingParams):
    """Prompts -> images (P * images_per_prompt, 3, H, W) in [-1, 1], grouped by prompt.

    Seeded without touching the caller's RNG state (a training run's RNG stays exact).
    """
    if not prompts:
        raise ValueError("no prompts given")
    rows = [vocab.prompt(text_tokenizer.encode(p)) for p in prompts for _ in range(params.images_per_prompt)]
    was_training = model.training
    model.eval()
    images = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(params.seed)
        for start in range(0, len(rows), params.batch_size):
            codes = generate_codes(model, vocab, rows[start : start + params.batch_size], params)
            images.append(image_tokenizer.decode(codes.to(next(image_tokenizer.parameters()).device)).cpu())
    model.train(was_training)
    return torch.cat(images)


def _wrap(text: str, width: int) -> list[str]:
    lines = [""]
    for word in text.split():
        if lines[-1] and len(lines[-1]) + 1 + len(word) > width:
            lines.append("")
        lines[-1] = f"{lines[-1]} {word}".strip()
    return lines


def make_grid(images: torch.Tensor, labels: list[str] | None = None, ncol: int = 8, cell: int = 128) -> Image.Image:
    """Images (B, 3, H, W) in [-1, 1] -> one PIL grid, each cell upscaled to `cell` px under its wrapped label."""
    n = images.shape[0]
    ncol = max(1, min(ncol, n))
    nrow = (n + ncol - 1) // ncol
    wrapped = [_wrap(label, cell // 6) for label in labels] if labels else []
    label_h = 11 * max((len(w) for w in wrapped), default=0) + (4 if labels else 0)
    grid = Image.new("RGB", (ncol * cell, nrow * (cell + label_h)), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    font = ImageFont.load_default()
    for i in range(n):
        r, c = divmod(i, ncol)
        x, y = c * cell, r * (cell + label_h)
        grid.paste(tensor_to_image(images[i]).resize((cell, cell), Image.NEAREST), (x, y + label_h))
        if labels:
            draw.multiline_text((x + 2, y + 1), "\n".join(wrapped[i]), fill=(0, 0, 0), font=font, spacing=1)
    return grid
