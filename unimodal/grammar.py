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

    def counts(self, ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """What the state after each prefix depends on: ids (B, T) -> {name: (B, T)} running counts."""
        v = self.vocab
        c = {"started": (ids == v.bos).cumsum(-1) > 0}
        for name, token in (("boi", v.boi), ("eoi", v.eoi), ("eos", v.eos)):
            c[name] = (ids == token).cumsum(-1) > 0
        is_text = v.is_text(ids) & c["started"]
        c["text"] = (is_text & ~c["boi"]).cumsum(-1)  # caption ids before the image (frozen after <boi>)
        c["image"] = v.is_image(ids).cumsum(-1)
        c["caption"] = (is_text & c["eoi"]).cumsum(-1)  # caption ids after the image
        return c

    def advance(self, c: dict[str, torch.Tensor], token: torch.Tensor) -> dict[str, torch.Tensor]:
        """The counts after one more id: `counts` of the last position (B,) and the next ids (B,) ->
        the counts `counts` would give one position later, in O(1) per row (what sampling needs)."""
        v = self.vocab
        n = {"started": c["started"] | (token == v.bos)}
        for name, t in (("boi", v.boi), ("eoi", v.eoi), ("eos", v.eos)):
            n[name] = c[name] | (token == t)
        is_text = v.is_text(token) & n["started"]
        n["text"] = c["text"] + (is_text & ~n["boi"])
        n["image"] = c["image"] + v.is_image(token)
        n["caption"] = c["caption"] + (is_text & n["eoi"])
        return n

    def state(self, c: dict[str, torch.Tensor]) -> torch.Tensor:
        """The grammar state from `counts` (any shape)."""
        v = self.vocab
        text = torch.where(c["text"] < v.max_text_tokens, TEXT, TEXT_FULL)
        image = torch.where(c["image"] < v.image_tokens, IMAGE, IMAGE_FULL)
        state = torch.where(c["boi"], image, text)
        after = torch.full_like(state, END)
        if v.image_to_text:
            caption = torch.where(c["caption"] < v.max_text_tokens, CAPTION, CAPTION_FULL)
            caption = torch.where(c["caption"] == 0, CAPTION_START, caption)
            after = torch.where(c["text"] == 0, caption, after)
        state = torch.where(c["eoi"], after, state)
        return torch.where(c["eos"], DONE, state)

    def states(self, ids: torch.Tensor) -> torch.Tensor:
        """State after each prefix: ids (B, T) -> states (B, T), states[:, t] is the state after ids[:, :t+1].

        Tokens before <bos> (left padding) are ignored; a prefix without <bos> is in TEXT only
        once <bos> appears, so callers always start sequences with it.
        """
        return self.state(self.counts(ids))

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

    Decoding calls it once per step with the prefix grown by one id: it then advances the last
    step's counts by that id (`SegmentGrammar.advance`) instead of recounting the whole prefix.
    """

    def __init__(self, grammar: SegmentGrammar):
        self.grammar = grammar
        self._last = None  # (prefix it was computed for, its last-position counts)
        self._bias = None  # (S, V) additive mask: 0 where allowed, -inf where forbidden

    def last_counts(self, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        if self._last is not None:
            prefix, counts = self._last
            if input_ids.shape == (prefix.shape[0], prefix.shape[1] + 1) and torch.equal(input_ids[:, :-1], prefix):
                return self.grammar.advance(counts, input_ids[:, -1])
        return {name: c[:, -1] for name, c in self.grammar.counts(input_ids).items()}

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        counts = self.last_counts(input_ids)
        self._last = (input_ids, counts)
        if self._bias is None or self._bias.shape[-1] != scores.shape[-1] or self._bias.device != scores.device:
            table = self.grammar.table.to(scores.device)
            bias = torch.full((table.shape[0], scores.shape[-1]), float("-inf"), device=scores.device)
            bias[:, : table.shape[-1]] = torch.where(table, 0.0, float("-inf"))  # ids past V stay forbidden
            self._bias = bias
        return scores + self._bias[self.grammar.state(counts)].to(scores.dtype)
