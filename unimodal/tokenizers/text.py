"""Text tokenizer: byte-level BPE trained with `tokenizers` on the training captions.

Saved as a plain `tokenizer.json`, so `transformers.PreTrainedTokenizerFast(tokenizer_file=...)`
loads it with no project code. Special tokens live in the joint vocabulary, not here: the BPE
covers text only, and its ids are the text range of `JointVocab`.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

TOKENIZER_FILE = "tokenizer.json"


def train_bpe(texts: Iterable[str], vocab_size: int = 1024, min_frequency: int = 2) -> Tokenizer:
    """Train byte-level BPE. The 256 byte symbols are always in the alphabet, so any text encodes."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


class TextTokenizer:
    """Thin wrapper: encode/decode without specials, fixed-size id range [0, vocab_size)."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int = 1024, min_frequency: int = 2) -> TextTokenizer:
        return cls(train_bpe(texts, vocab_size, min_frequency))

    @classmethod
    def load(cls, directory: str | Path) -> TextTokenizer:
        path = Path(directory) / TOKENIZER_FILE
        if not path.is_file():
            raise FileNotFoundError(f"no text tokenizer at {path}: train one first (stage-2 data does it).")
        return cls(Tokenizer.from_file(str(path)))

    def save(self, directory: str | Path) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / TOKENIZER_FILE
        tmp = path.with_suffix(".tmp")
        self.tokenizer.save(str(tmp))
        tmp.replace(path)
        return path

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tokenizer.encode_batch(texts)]

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(list(ids)).strip()
