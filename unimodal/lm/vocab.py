"""The joint vocabulary: the one place that does id arithmetic.

Layout of the joint id space (V = text_size + image_size + 5, + one level id per scale):

    [0, text_size)                          BPE text ids, unchanged
    [text_size, text_size + image_size)     image codes, shifted by text_size
    then <bos> <boi> <eoi> <eos> <pad>
    then, with `image_scales` (next-scale prediction), one level id per scale

A text-to-image sequence is `<bos> text... <boi> code x N <eoi> <eos>`. With `image_scales` (VAR's
multi-scale codes) the N = sum s^2 codes are the scales' maps concatenated coarse to fine, and the
level ids never appear in a sequence: their embeddings mark which scale an input position serves
(`unimodal.lm.next_scale`), in the same embedding table as every other id.

With `image_to_text` the layout also has the other order, `<bos> <boi> code x N <eoi> text... <eos>`
(captioning). The two orders share `<bos> <boi>`: the rule (enforced by the grammar) is that a caption
comes at most once, before the image or after it, so an image with no text before it may be followed
by one. The empty caption of classifier-free guidance, `<bos> <boi> codes <eoi> <eos>`, is the same image with no
caption after it either.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

SPECIALS = ("<bos>", "<boi>", "<eoi>", "<eos>", "<pad>")
VOCAB_FILE = "vocab.json"


@dataclass(frozen=True)
class JointVocab:
    text_size: int  # BPE vocabulary size
    image_size: int  # codebook size K of the image tokenizer
    image_grid: tuple[int, int]  # (h, w) of the code grid; N = h * w image tokens per image
    max_text_tokens: int = 32  # text budget per caption; longer captions are truncated
    image_to_text: bool = False  # the layout also has `<bos> <boi> codes <eoi> text <eos>` (captioning)
    image_scales: tuple[int, ...] | None = None  # multi-scale codes (VAR): side of each scale, the last = grid

    def __post_init__(self):
        object.__setattr__(self, "image_grid", tuple(self.image_grid))
        if self.image_scales is not None:
            object.__setattr__(self, "image_scales", tuple(int(s) for s in self.image_scales))
            self._check_scales()
        for name in ("text_size", "image_size", "max_text_tokens"):
            if getattr(self, name) <= 0:
                raise ValueError(f"JointVocab.{name} must be positive, got {getattr(self, name)}")
        if len(self.image_grid) != 2 or min(self.image_grid) <= 0:
            raise ValueError(f"JointVocab.image_grid must be (h, w) > 0, got {self.image_grid}")

    def _check_scales(self):
        s = self.image_scales
        if not s or s[0] != 1 or any(a >= b for a, b in zip(s, s[1:])) or (s[-1], s[-1]) != self.image_grid:
            raise ValueError(
                f"JointVocab.image_scales must ascend from 1 to the grid side {self.image_grid}, got {list(s)}: "
                "the first scale is the one token predicted from <boi>"
            )
        if self.image_to_text:
            raise ValueError("next-scale images (image_scales) do not support image_to_text; set data.i2t_fraction: 0")

    # ---- ranges and specials
    @property
    def image_offset(self) -> int:
        return self.text_size

    @property
    def special_offset(self) -> int:
        return self.text_size + self.image_size

    @property
    def size(self) -> int:
        return self.level_offset + len(self.image_scales or ())

    @property
    def level_offset(self) -> int:
        return self.special_offset + len(SPECIALS)

    def level(self, k: int) -> int:
        """The id whose embedding marks the inputs that predict scale k (next-scale images only)."""
        if self.image_scales is None or not 0 <= k < len(self.image_scales):
            raise ValueError(f"no level id {k}: the vocabulary has image_scales {self.image_scales}")
        return self.level_offset + k

    @property
    def image_tokens(self) -> int:
        if self.image_scales is not None:
            return sum(s * s for s in self.image_scales)
        return self.image_grid[0] * self.image_grid[1]

    @property
    def codes_shape(self) -> tuple[int, ...]:
        """One image's codes as the image tokenizer gives them: the grid (h, w), or (N,) with `image_scales`."""
        return (self.image_tokens,) if self.image_scales is not None else self.image_grid

    @property
    def max_sequence_length(self) -> int:
        return 1 + self.max_text_tokens + 1 + self.image_tokens + 2

    def special(self, name: str) -> int:
        return self.special_offset + SPECIALS.index(name)

    bos = property(lambda self: self.special("<bos>"))
    boi = property(lambda self: self.special("<boi>"))
    eoi = property(lambda self: self.special("<eoi>"))
    eos = property(lambda self: self.special("<eos>"))
    pad = property(lambda self: self.special("<pad>"))

    def is_text(self, ids: torch.Tensor) -> torch.Tensor:
        return ids < self.text_size

    def is_image(self, ids: torch.Tensor) -> torch.Tensor:
        return (ids >= self.image_offset) & (ids < self.special_offset)

    # ---- conversions between local and joint ids
    def codes_to_ids(self, codes: torch.Tensor) -> torch.Tensor:
        """Code grid (..., h, w) in [0, K) -> joint ids (..., N), raster order. With `image_scales` the
        codes are already one row per image (..., N), the scales concatenated coarse to fine."""
        if self.image_scales is not None:
            if codes.shape[-1] != self.image_tokens:
                raise ValueError(f"multi-scale codes must be (..., {self.image_tokens}), got {tuple(codes.shape)}")
            return codes + self.image_offset
        return codes.flatten(-2) + self.image_offset

    def ids_to_codes(self, ids: torch.Tensor) -> torch.Tensor:
        """Joint image ids (..., N) -> code grid (..., h, w) (with `image_scales`: codes (..., N))."""
        if not bool(self.is_image(ids).all()):
            raise ValueError("ids_to_codes got ids outside the image range")
        if self.image_scales is not None:
            return ids - self.image_offset
        return (ids - self.image_offset).reshape(*ids.shape[:-1], *self.image_grid)

    def truncate_text(self, text_ids: list[int]) -> list[int]:
        return list(text_ids[: self.max_text_tokens])

    def text_to_image_sequence(self, text_ids: list[int], codes: torch.Tensor) -> list[int]:
        """`<bos> text <boi> codes <eoi> <eos>` as a list of joint ids."""
        image = self.codes_to_ids(codes).tolist()
        return [self.bos, *self.truncate_text(text_ids), self.boi, *image, self.eoi, self.eos]

    def prompt(self, text_ids: list[int]) -> list[int]:
        """The prefix that asks for an image: `<bos> text <boi>`."""
        return [self.bos, *self.truncate_text(text_ids), self.boi]

    def image_to_text_sequence(self, text_ids: list[int], codes: torch.Tensor) -> list[int]:
        """`<bos> <boi> codes <eoi> text <eos>` as a list of joint ids (the captioning order)."""
        image = self.codes_to_ids(codes).tolist()
        return [self.bos, self.boi, *image, self.eoi, *self.truncate_text(text_ids), self.eos]

    def caption_prompt(self, codes: torch.Tensor) -> list[int]:
        """The prefix that asks for a caption: `<bos> <boi> codes <eoi>`."""
        return [self.bos, self.boi, *self.codes_to_ids(codes).tolist(), self.eoi]

    def unconditional_prompt(self) -> list[int]:
        """The empty caption (classifier-free guidance's null condition): `<bos> <boi>`."""
        return [self.bos, self.boi]

    def split_sequence(self, ids: list[int]) -> tuple[list[int], list[int]]:
        """A sequence in either order -> (text ids, local image codes); specials and padding dropped."""
        text = [i for i in ids if i < self.text_size]
        codes = [i - self.image_offset for i in ids if self.image_offset <= i < self.special_offset]
        return text, codes

    # ---- persistence
    def to_dict(self) -> dict:
        d = asdict(self)
        d["image_grid"] = list(self.image_grid)
        if self.image_scales is None:
            del d["image_scales"]  # a raster vocabulary's file stays as it was
        else:
            d["image_scales"] = list(self.image_scales)
        d["specials"] = {name: self.special(name) for name in SPECIALS}
        d["size"] = self.size
        return d

    @classmethod
    def from_dict(cls, d: dict) -> JointVocab:
        return cls(
            d["text_size"], d["image_size"], tuple(d["image_grid"]), d.get("max_text_tokens", 32),
            d.get("image_to_text", False), d.get("image_scales"),
        )  # fmt: skip

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / VOCAB_FILE
        path.write_text(json.dumps(self.to_dict(), indent=2))
        return path

    @classmethod
    def load(cls, directory: str | Path) -> JointVocab:
        path = Path(directory) / VOCAB_FILE
        if not path.is_file():
            raise FileNotFoundError(f"no joint vocabulary at {path}")
        return cls.from_dict(json.loads(path.read_text()))


def right_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Joint-id sequences right-padded to the longest: (B, T) ids and attention mask, as training reads them."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.as_tensor(r)
        mask[i, : len(r)] = 1
    return ids, mask
