"""The segment grammar: the one place that decides which ids may follow a prefix.

Sequences are `<bos> text{0..T} <boi> code{N} <eoi> <eos>`; with `vocab.image_to_text` also
`<bos> <boi> code{N} <eoi> text{0..T} <eos>` (a caption comes at most once: before the image or, if
there was none before, after it). The grammar is a small state machine
whose state after any prefix follows in closed form from counts over the prefix, so it is computed
for every position of a batch at once (training) or for the last position (sampling):

    TEXT        after <bos> and fewer than T text ids: any text id or <boi>
    TEXT_FULL   text budget used up: <boi>
    IMAGE       inside the image with fewer than N codes: any image id
    IMAGE_FULL  N codes emitted: <eoi>
    END         after <eoi> when the caption came first: <eos>
    DONE        after <eos>: <pad> (what `generate()` appends to finished rows)
    CAPTION_START  (image_to_text) after <eoi> with no text before <boi>: any text id or <eos>
                   (text only with `require_caption`, which captioning uses)
    CAPTION        fewer than T caption ids after <eoi>: any text id or <eos>
    CAPTION_FULL   caption budget used up: <eos>

The same object drives the `transformers` LogitsProcessor at generation and the optional
grammar masking of the training loss, and it labels each target token with its segment
(text or image) for per-segment loss weights.
"""

from __future__ import annotations

import torch
from transformers import LogitsProcessor

from .vocab import JointVocab

TEXT, TEXT_FULL, IMAGE, IMAGE_FULL, END, DONE, CAPTION_START, CAPTION, CAPTION_FULL = range(9)
STATE_NAMES = ("TEXT", "TEXT_FULL", "IMAGE", "IMAGE_FULL", "END", "DONE", "CAPTION_START", "CAPTION", "CAPTION_FULL")
SEGMENT_TEXT, SEGMENT_IMAGE = 0, 1


class SegmentGrammar:
    """`require_caption`: after an image with no caption before it, at least one caption id must
    follow (captioning must not stop at once; CFG's empty-caption training rows end that way)."""

    def __init__(self, vocab: JointVocab, require_caption: bool = False):
        if require_caption and not vocab.image_to_text:
            raise ValueError("require_caption needs a vocabulary with image_to_text (train with data.i2t_fraction > 0)")
        self.vocab = vocab
        v = vocab
        table = torch.zeros(len(STATE_NAMES), v.size, dtype=torch.bool)  # (S, V): allowed next ids per state
        table[TEXT, : v.text_size] = True
        table[TEXT, v.boi] = True
        table[TEXT_FULL, v.boi] = True
        table[IMAGE, v.image_offset : v.special_offset] = True
        table[IMAGE_FULL, v.eoi] = True
        table[END, v.eos] = True
        table[DONE, v.pad] = True
        table[CAPTION_START, : v.text_size] = True
        table[CAPTION_START, v.eos] = not require_caption
        table[CAPTION, : v.text_size] = True
        table[CAPTION, v.eos] = True
        table[CAPTION_FULL, v.eos] = True
        self.table = table

    def states(self, ids: torch.Tensor) -> torch.Tensor:
        """State after each prefix: ids (B, T) -> states (B, T), states[:, t] is the state after ids[:, :t+1].

        Tokens before <bos> (left padding) are ignored; a prefix without <bos> is in TEXT only
        once <bos> appears, so callers always start sequences with it.
        """
        v = self.vocab
        started = (ids == v.bos).cumsum(-1) > 0
        seen_boi = (ids == v.boi).cumsum(-1) > 0
        seen_eoi = (ids == v.eoi).cumsum(-1) > 0
        seen_eos = (ids == v.eos).cumsum(-1) > 0
        is_text = v.is_text(ids) & started
        n_text = (is_text & ~seen_boi).cumsum(-1)  # caption ids before the image (frozen after <boi>)
        n_image = v.is_image(ids).cumsum(-1)
        text = torch.where(n_text < v.max_text_tokens, TEXT, TEXT_FULL)
        image = torch.where(n_image < v.image_tokens, IMAGE, IMAGE_FULL)
        state = torch.where(seen_boi, image, text)
        after = torch.full_like(state, END)
        if v.image_to_text:
            n_caption = (is_text & seen_eoi).cumsum(-1)  # caption ids after the image
            caption = torch.where(n_caption < v.max_text_tokens, CAPTION, CAPTION_FULL)
            caption = torch.where(n_caption == 0, CAPTION_START, caption)
            after = torch.where(n_text == 0, caption, after)
        state = torch.where(seen_eoi, after, state)
        return torch.where(seen_eos, torch.full_like(state, DONE), state)

    def allowed_next(self, ids: torch.Tensor) -> torch.Tensor:
        """ids (B, T) -> bool mask (B, V) of the ids allowed after each full prefix."""
        return self.table.to(ids.device)[self.states(ids)[:, -1]]

    def allowed_per_position(self, ids: torch.Tensor) -> torch.Tensor:
        """ids (B, T) -> bool mask (B, T, V): allowed ids for the target at t+1 given ids[:, :t+1]."""
        return self.table.to(ids.device)[self.states(ids)]

    def is_valid(self, ids: list[int]) -> bool:
        """True if a whole sequence (starting with <bos>) obeys the grammar at every step."""
        t = torch.tensor([ids])
        allowed = self.allowed_per_position(t)[0, :-1]  # (T-1, V)
        return ids[0] == self.vocab.bos and bool(allowed[torch.arange(len(ids) - 1), t[0, 1:]].all())

    def target_segments(self, ids: torch.Tensor) -> torch.Tensor:
        """Segment of each token, for loss weights: image codes are IMAGE, everything else TEXT."""
        return torch.where(self.vocab.is_image(ids), SEGMENT_IMAGE, SEGMENT_TEXT)


class GrammarLogitsProcessor(LogitsProcessor):
    """Sets the logits of ids the grammar forbids to -inf, before temperature/top-k/top-p.

    `generate()` runs custom processors before its sampling warpers, so top-k never keeps only
    forbidden ids, and every sampled sequence is well formed: exactly N codes, then <eoi> <eos>.
    """

    def __init__(self, grammar: SegmentGrammar):
        self.grammar = grammar

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        allowed = self.grammar.allowed_next(input_ids)  # (B, V)
        forbidden = torch.ones_like(scores, dtype=torch.bool)  # ids past V (padded embeddings) stay forbidden
        forbidden[:, : allowed.shape[-1]] = ~allowed
        return scores.masked_fill(forbidden, float("-inf"))
