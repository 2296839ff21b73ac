"""How the models' parts are stored (the image tokenizer, its diffusion decoder, the continuous latent
head): a folder with `config.json` and `model.safetensors`, the weights written under a temporary name
and renamed, so that a reader never sees half a file."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


def write_folder(directory: str | Path, config: dict, tensors: dict[str, torch.Tensor]) -> Path:
    """config.json + model.safetensors (atomically) in `directory`, created if needed."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2))
    tmp = directory / (WEIGHTS_FILE + ".tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
    tmp.replace(directory / WEIGHTS_FILE)
    return directory
