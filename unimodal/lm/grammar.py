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

import functools

import torch
from transformers import LogitsProcessor

from unimodal.lm.vocab import JointVocab

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
        self.require_caption = require_caption
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

    @property
    def steps(self) -> GrammarSteps:
        """This grammar's one-step tables for decoding (built once per vocabulary and setting, ~2 ms)."""
        return _grammar_steps(self.vocab, self.require_caption)

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

    def image_range(self, ids: torch.Tensor) -> tuple[int, int]:
        """Prompts (B, T) that each stand right after <boi> -> (lo, hi): every image step allows exactly
        the ids lo..hi-1 (the codes) until the image is full. For decoding loops that draw a whole image
        over one range without asking the grammar at each step; refuses prompts in any other state."""
        c = self.counts(ids)
        at_start = (self.state(c)[:, -1] == IMAGE) & (c["image"][:, -1] == 0)  # (B,)
        if not bool(at_start.all()):
            bad = (~at_start).nonzero().flatten().tolist()
            raise ValueError(f"prompts {bad[:5]} do not stand at the start of an image (end them with <boi>)")
        support = _one_range(self.table[IMAGE])
        if support is None:
            raise ValueError("this vocabulary's image ids are not one contiguous range")
        return support

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


FLAGS = ("started", "boi", "eoi", "eos")  # the yes/no counts, bit i of a packed flags integer
COUNTS = ("text", "image", "caption")  # the running counts


def _unique_rows(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Groups of equal rows of an integer matrix (N, D): (a row index of each group (K,), each row's
    group (N,)), as `torch.unique(rows, dim=0)` groups them, but by a sort of N random projections."""

    def one_of_each(group: torch.Tensor) -> torch.Tensor:
        return group.new_zeros(int(group.max()) + 1).scatter_(0, group, torch.arange(len(rows)))

    projection = torch.rand(rows.shape[1], dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    _, group = torch.unique(rows.double() @ projection, return_inverse=True)
    first = one_of_each(group)
    if not torch.equal(rows[first][group], rows):  # two different rows shared a projection
        _, group = torch.unique(rows, dim=0, return_inverse=True)
        first = one_of_each(group)
    return first, group


def _one_range(allowed: torch.Tensor) -> tuple[int, int] | None:
    """A bool row (V,) -> (lo, hi) if its True entries are exactly ids lo..hi-1, else None."""
    ids = allowed.nonzero().flatten().tolist()
    return (ids[0], ids[-1] + 1) if ids and ids[-1] - ids[0] + 1 == len(ids) else None


class GrammarSteps:
    """`SegmentGrammar.advance` and `SegmentGrammar.state` for one decoding step, as lookups in small
    tables of Python ints.

    The grammar moves a row by the kind of id it appends, and which kinds exist follows from
    `advance` itself: every id's effect (new flags, count increments) under each of the 16 flag
    combinations is evaluated once, and ids with the same effects share a kind. The state depends
    on each count only through whether it is 0, in between, or at its limit (T text or caption ids,
    N codes), so it is a (16, 3, 3, 3) table evaluated from `state`. A decoding step then reads the
    new ids once (`tolist`) and looks each distinct row up in Python. Inside `generate()` on a 2-core
    CPU: 19 us per step at batch 1 and 63-65 us at batch 64 (8 and 25 us timed alone, the rest cold
    caches after the forward), where `advance` + `state` as ~35 operations on (B,) tensors took 80
    and 157 us (12% of a compiled batch-1 decoding step).
    A row is (flags, (text, image, caption)): the four yes/no counts as bits of one int, and the counts.
    """

    def __init__(self, grammar: SegmentGrammar):
        v = grammar.vocab
        combos = torch.arange(2 ** len(FLAGS))[:, None].expand(-1, v.size)  # (16, V)
        before = {name: (combos >> i) & 1 == 1 for i, name in enumerate(FLAGS)}
        effects = []
        for base in (0, 1):  # evaluated at two count levels: increments must not depend on the counts
            c = {**before, **{name: torch.full_like(combos, base) for name in COUNTS}}
            after = grammar.advance(c, torch.arange(v.size).expand_as(combos))
            effects.append(torch.stack([self._pack_flags(after)] + [after[n] - base for n in COUNTS], -1))
        if not torch.equal(*effects):
            raise RuntimeError(
                "SegmentGrammar.advance: count increments depend on the counts; GrammarSteps cannot table them"
            )
        effect = effects[0]  # (16, V, 4): flags after, text/image/caption increments
        per_id = effect.transpose(0, 1).flatten(1)  # (V, 64): one id's effects under every flag combination
        # ids with equal effects, grouped by a random projection (a sort of V numbers; unique(dim=0)
        # over the rows costs 2 ms per call), then checked exactly
        first, kind = _unique_rows(per_id)
        kinds = per_id[first].view(-1, *effect.shape[::2]).transpose(0, 1)  # (16, K, 4)
        self.kind = kind.tolist()  # id -> kind
        self.effect = [[(k[0], tuple(k[1:])) for k in row] for row in kinds.tolist()]  # [flags][kind]
        self.limits = (v.max_text_tokens, v.image_tokens, v.max_text_tokens)
        reps = torch.tensor([[0, 1, limit] for limit in self.limits])  # a count of each bucket
        grid = torch.meshgrid(torch.arange(16), reps[0], reps[1], reps[2], indexing="ij")  # (16, 3, 3, 3) each
        flags = {name: (grid[0] >> i) & 1 == 1 for i, name in enumerate(FLAGS)}
        self.table = grammar.state({**flags, **dict(zip(COUNTS, grid[1:], strict=True))}).tolist()
        # per state, the ids it allows as one range [lo, hi), or None where they are not one range
        self.ranges = [_one_range(row) for row in grammar.table]

    @staticmethod
    def _pack_flags(c: dict[str, torch.Tensor]) -> torch.Tensor:
        return sum(c[name].long() << i for i, name in enumerate(FLAGS))

    def rows(self, c: dict[str, torch.Tensor]) -> list[tuple[int, tuple[int, int, int]]]:
        """`SegmentGrammar.counts` of one position (B,) each -> one row per sequence."""
        counts = torch.stack([c[name] for name in COUNTS], -1).tolist()
        return [(f, tuple(n)) for f, n in zip(self._pack_flags(c).tolist(), counts, strict=True)]

    def _move(self, row: tuple, kind: int) -> tuple:
        after, inc = self.effect[row[0]][kind]
        return after, tuple(n + i for n, i in zip(row[1], inc))

    def _state(self, row: tuple) -> int:
        flags, counts = row
        b = [(n >= 1) + (n >= limit) for n, limit in zip(counts, self.limits)]  # 0, between, at the limit
        return self.table[flags][b[0]][b[1]][b[2]]

    def advance(self, rows: list, tokens: list[int]) -> list:
        """Each row one id later. Rows in a batch mostly move alike (every row of an image gains one
        code per step), so each distinct (row, kind of id) is worked out once: the whole batch at once
        when every row and every id's kind are the same."""
        kinds = [self.kind[token] for token in tokens]
        if _all_alike(rows) and _all_alike(kinds):
            return [self._move(rows[0], kinds[0])] * len(rows)
        moves, out = {}, []
        for key in zip(rows, kinds, strict=True):
            if key not in moves:
                moves[key] = self._move(*key)
            out.append(moves[key])
        return out

    def states(self, rows: list) -> list[int]:
        if _all_alike(rows):
            return [self._state(rows[0])] * len(rows)
        known = {}
        for row in rows:
            if row not in known:
                known[row] = self._state(row)
        return [known[row] for row in rows]


def _all_alike(items: list) -> bool:
    """Whether a batch's rows (or ids, or states) are all equal: the common case, worked out once."""
    return bool(items) and items.count(items[0]) == len(items)


@functools.lru_cache(maxsize=8)
def _grammar_steps(vocab: JointVocab, require_caption: bool) -> GrammarSteps:
    return GrammarSteps(SegmentGrammar(vocab, require_caption))


class GrammarLogitsProcessor(LogitsProcessor):
    """Sets the logits of ids the grammar forbids to -inf, before temperature/top-k/top-p.

    `generate()` runs custom processors before its sampling warpers, so top-k never keeps only
    forbidden ids, and every sampled sequence is well formed: exactly N codes, then <eoi> <eos>.

    Decoding calls it once per step with the prefix grown by one id: it then advances the last
    step's counts by that id (`GrammarSteps`) instead of recounting the whole prefix.
    """

    def __init__(self, grammar: SegmentGrammar):
        self.grammar = grammar
        self.steps = grammar.steps
        self._last = None  # (prefix it was computed for, its rows)
        self._bias = None  # (S, V) additive mask: 0 where allowed, -inf where forbidden
        self.support = None  # after a call: [lo, hi) holding every id any row may take next, or None

    def last_rows(self, input_ids: torch.Tensor) -> list:
        if self._last is not None:
            prefix, rows = self._last
            if input_ids.shape == (prefix.shape[0], prefix.shape[1] + 1) and torch.equal(input_ids[:, :-1], prefix):
                return self.steps.advance(rows, input_ids[:, -1].tolist())
        return self.steps.rows({name: c[:, -1] for name, c in self.grammar.counts(input_ids).items()})

    def step(self, input_ids: torch.LongTensor) -> list[int]:
        """Move to this prefix: each row's grammar state. Sets `support`: the range [lo, hi) of ids every
        row may take next when all rows are in one state that allows one range (an image's codes), else None."""
        rows = self.last_rows(input_ids)
        self._last = (input_ids, rows)
        states = self.steps.states(rows)
        self.support = self.steps.ranges[states[0]] if _all_alike(states) else None
        return states

    def mask(self, states: list[int], scores: torch.FloatTensor) -> torch.FloatTensor:
        """Scores with the ids each row's state forbids at -inf (a new tensor)."""
        like = (scores.shape[-1], scores.device, scores.dtype)
        if self._bias is None or (self._bias.shape[-1], self._bias.device, self._bias.dtype) != like:
            table = self.grammar.table.to(scores.device)
            bias = torch.full((table.shape[0], scores.shape[-1]), float("-inf"), device=scores.device)
            bias[:, : table.shape[-1]] = torch.where(table, 0.0, float("-inf"))  # ids past V stay forbidden
            self._bias = bias.to(scores.dtype)
        if _all_alike(states):  # every row in one state (always, drawing images): one row of the table
            return scores + self._bias[states[0]]
        return scores + self._bias[torch.tensor(states, device=scores.device)]

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        return self.mask(self.step(input_ids), scores)
