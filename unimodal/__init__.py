"""unimodal: unified multimodal token models (DALL-E / Janus style).

Text and images become tokens of one joint vocabulary; one decoder-only transformer models
p(caption, image) and generates images from text, token by token.

    from unimodal import Bundle, SamplingParams, save_grid
    bundle = Bundle.load("demo/runs/shapes-transformer/export")
    images = bundle.generate(["a large red circle at the top left"], SamplingParams(images_per_prompt=4))

The names below are imported on first use, so `import unimodal.evaluation.judge` (say) loads no
generation or training code.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "Bundle": "unimodal.generation.bundle",
    "generate_images": "unimodal.generation.bundle",
    "SamplingParams": "unimodal.generation.sampling",
    "JointVocab": "unimodal.lm.vocab",
    "SegmentGrammar": "unimodal.lm.grammar",
    "ImageTokenizer": "unimodal.tokenizers.image",
    "TextTokenizer": "unimodal.tokenizers.text",
    "DataSource": "unimodal.data.pairs",
    "load_pairs": "unimodal.data.pairs",
    "make_grid": "unimodal.viz",
    "save_grid": "unimodal.viz",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'unimodal' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
