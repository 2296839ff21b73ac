"""The bundle: a trained system in one folder, loaded by one call.

    bundle/
      bundle.json                 format marker and what is inside
      vocab.json                  the joint vocabulary (id layout, image grid, text budget)
      text_tokenizer/tokenizer.json
      image_tokenizer/config.json + model.safetensors
      transformer/config.json + model.safetensors (+ generation_config.json)

Weights are safetensors only; nothing is unpickled.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel

from .image_tokenizer import ImageTokenizer
from .sampling import SamplingParams, generate_images
from .text_tokenizer import TextTokenizer
from .vocab import JointVocab

BUNDLE_FILE = "bundle.json"
FORMAT = "unimodal-bundle/1"


@dataclass
class Bundle:
    text_tokenizer: TextTokenizer
    image_tokenizer: ImageTokenizer
    vocab: JointVocab
    transformer: PreTrainedModel

    def generate(self, prompts: list[str], params: SamplingParams | None = None) -> torch.Tensor:
        """Prompts -> images (P * images_per_prompt, 3, H, W) in [-1, 1]."""
        params = params or SamplingParams()
        return generate_images(self.transformer, self.vocab, self.text_tokenizer, self.image_tokenizer, prompts, params)

    def save(self, directory: str | Path) -> Path:
        """Write to a temporary sibling folder, then swap it in: a crash never leaves half a bundle."""
        directory = Path(directory)
        tmp = directory.with_name(directory.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        self.text_tokenizer.save(tmp / "text_tokenizer")
        self.image_tokenizer.save_pretrained(tmp / "image_tokenizer")
        self.transformer.save_pretrained(tmp / "transformer", safe_serialization=True)
        self.vocab.save(tmp)
        (tmp / BUNDLE_FILE).write_text(json.dumps({"format": FORMAT, "vocab_size": self.vocab.size}, indent=2))
        old = directory.with_name(directory.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        if directory.exists():
            directory.rename(old)
        tmp.rename(directory)
        shutil.rmtree(old, ignore_errors=True)
        return directory

    @classmethod
    def load(cls, directory: str | Path, device: str = "cpu") -> Bundle:
        directory = Path(directory)
        if not (directory / BUNDLE_FILE).is_file():
            raise FileNotFoundError(
                f"{directory} is not a unimodal bundle (no {BUNDLE_FILE}); pass the folder a transformer fit "
                "run exported (e.g. runs/<name>/bundle) or that `unimodal demo` printed."
            )
        vocab = JointVocab.load(directory)
        text = TextTokenizer.load(directory / "text_tokenizer")
        image = ImageTokenizer.from_pretrained(directory / "image_tokenizer").to(device)
        transformer = AutoModelForCausalLM.from_pretrained(directory / "transformer", use_safetensors=True)
        problems = []
        if text.vocab_size != vocab.text_size:
            problems.append(f"text tokenizer has {text.vocab_size} ids, vocab.json says {vocab.text_size}")
        if image.codebook_size != vocab.image_size or image.grid != vocab.image_grid:
            problems.append(
                f"image tokenizer has K={image.codebook_size}, grid {image.grid}; "
                f"vocab.json says K={vocab.image_size}, grid {vocab.image_grid}"
            )
        if transformer.config.vocab_size < vocab.size:
            problems.append(f"transformer has {transformer.config.vocab_size} ids, vocab.json needs {vocab.size}")
        if problems:
            raise ValueError(f"bundle {directory} is inconsistent: " + "; ".join(problems) + ". Re-export it.")
        return cls(text, image, vocab, transformer.to(device).eval())
