"""The bundle: a trained system in one folder, loaded by one call, and text-to-image generation with it.

    bundle/
      bundle.json                 format marker and what is inside
      vocab.json                  the joint vocabulary (id layout, image grid, text budget)
      text_tokenizer/tokenizer.json
      image_tokenizer/config.json + model.safetensors
      transformer/config.json + model.safetensors (+ generation_config.json)
      data.json                   the data source it was trained on (evaluation reads the same data)
      image_head/config.json + model.safetensors      continuous image tokens only (`quantizer: kl`)

With continuous image tokens the vocabulary has one image id (the slot of a latent), the transformer
reads and predicts the latents through the image head (`unimodal.lm.continuous`), and sampling takes
`unimodal.generation.continuous`.

Weights are safetensors only; nothing is unpickled.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel

from unimodal.generation.continuous import generate_continuous_images
from unimodal.generation.next_scale import generate_codes_next_scale
from unimodal.generation.sampling import SamplingParams, generate_codes
from unimodal.lm.continuous import LatentHead
from unimodal.lm.vocab import JointVocab
from unimodal.tokenizers.image import ImageTokenizer
from unimodal.tokenizers.text import TextTokenizer

BUNDLE_FILE = "bundle.json"
DATA_FILE = "data.json"
FORMAT = "unimodal-bundle/1"


@dataclass
class Bundle:
    text_tokenizer: TextTokenizer
    image_tokenizer: ImageTokenizer
    vocab: JointVocab
    transformer: PreTrainedModel
    data: dict | None = None  # DataSource.to_dict() of the training data; None when not recorded
    image_head: LatentHead | None = None  # continuous image tokens: latents in and the diffusion head

    def generate(self, prompts: list[str], params: SamplingParams | None = None) -> torch.Tensor:
        """Prompts -> images (P * images_per_prompt, 3, H, W) in [-1, 1]."""
        params = params or SamplingParams()
        if self.image_head is not None:
            if params.compile or params.greedy or params.top_k is not None or params.top_p is not None:
                raise ValueError("continuous image tokens take temperature and cfg_scale only (no compile, "
                                 "greedy, top_k or top_p)")  # fmt: skip
            return generate_continuous_images(self.transformer, self.image_head, self.vocab, self.text_tokenizer,
                                              self.image_tokenizer, prompts, params)  # fmt: skip
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
        if self.image_head is not None:
            self.image_head.save_pretrained(tmp / "image_head")
        self.vocab.save(tmp)
        if self.data is not None:
            (tmp / DATA_FILE).write_text(json.dumps(self.data, indent=2))
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
        head = LatentHead.from_pretrained(directory / "image_head") if (directory / "image_head").is_dir() else None
        problems = []
        if text.vocab_size != vocab.text_size:
            problems.append(f"text tokenizer has {text.vocab_size} ids, vocab.json says {vocab.text_size}")
        if image.continuous or head is not None:
            problems += _continuous_problems(image, head, vocab, transformer)
        elif image.codebook_size != vocab.image_size or image.grid != vocab.image_grid:
            problems.append(
                f"image tokenizer has K={image.codebook_size}, grid {image.grid}; "
                f"vocab.json says K={vocab.image_size}, grid {vocab.image_grid}"
            )
        if image.scales != vocab.image_scales:
            problems.append(f"image tokenizer has scales {image.scales}, vocab.json says {vocab.image_scales}")
        if transformer.config.vocab_size < vocab.size:
            problems.append(f"transformer has {transformer.config.vocab_size} ids, vocab.json needs {vocab.size}")
        if problems:
            raise ValueError(f"bundle {directory} is inconsistent: " + "; ".join(problems) + ". Re-export it.")
        data = json.loads((directory / DATA_FILE).read_text()) if (directory / DATA_FILE).is_file() else None
        return cls(text, image, vocab, transformer.to(device).eval(), data,
                   head.to(device) if head is not None else None)  # fmt: skip


def _continuous_problems(image: ImageTokenizer, head: LatentHead | None, vocab: JointVocab, transformer) -> list[str]:
    """What does not fit together in a bundle of continuous image tokens."""
    if not image.continuous or head is None:
        return [f"image tokenizer {'is' if image.continuous else 'is not'} continuous but image_head/ is "
                f"{'missing' if head is None else 'there'}"]  # fmt: skip
    problems = []
    if vocab.image_size != 1 or image.grid != vocab.image_grid:
        problems.append(f"vocab.json has {vocab.image_size} image ids and grid {vocab.image_grid}; continuous "
                        f"tokens need 1 (the slot) and the tokenizer's grid {image.grid}")  # fmt: skip
    if head.config.token_dim != image.config.latent_dim:
        problems.append(f"image head reads {head.config.token_dim} channels, the tokenizer's latent has "
                        f"{image.config.latent_dim}")  # fmt: skip
    if head.config.cond_dim != transformer.config.hidden_size:
        problems.append(f"image head is conditioned on width {head.config.cond_dim}, the transformer's is "
                        f"{transformer.config.hidden_size}")  # fmt: skip
    return problems


def image_codes(model, vocab, prompt_ids: list[list[int]], params: SamplingParams) -> torch.Tensor:
    """Joint-id prompts (each `<bos> text <boi>`) -> code grids (B, h, w): the plain path (`generate()`),
    or with `params.compile` the fast path (`generation.fast`: the same codes, an own compiled loop); for a
    next-scale vocabulary, codes (B, N) from `generation.next_scale`."""
    if vocab.image_scales is not None:  # multi-scale codes: one forward per scale (VAR)
        return generate_codes_next_scale(model, vocab, prompt_ids, params)
    if params.compile:
        from unimodal.generation.fast.decode import generate_codes_fast

        return generate_codes_fast(model, vocab, prompt_ids, params)
    return generate_codes(model, vocab, prompt_ids, params)


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
            codes = image_codes(model, vocab, rows[start : start + params.batch_size], params)
            codes = codes.to(next(image_tokenizer.parameters()).device)
            images.append(image_tokenizer.decode(codes, params.decoder).cpu())
    model.train(was_training)
    return torch.cat(images)
