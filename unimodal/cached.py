"""Small helper networks (the shapes judge, the reranker) trained once per config and cached in a folder."""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path

from safetensors.torch import load_file, save_file
from torch import nn


def load_or_train(directory: str | Path, config, model_class, train) -> nn.Module:
    """A small evaluation model trained once per config and cached in `directory` (config.json +
    model.safetensors); `train()` builds and trains it when the cache is missing or stale."""
    directory = Path(directory)
    cfg_file, weights = directory / "config.json", directory / "model.safetensors"
    if cfg_file.is_file() and weights.is_file() and json.loads(cfg_file.read_text()) == asdict(config):
        model = model_class(config)
        model.load_state_dict(load_file(str(weights)))
        return model.eval()
    model = train()
    directory.mkdir(parents=True, exist_ok=True)
    # per-process temporary names, then renames: runs sharing a cache never read or mix half files
    tmp_weights, tmp_cfg = weights.with_suffix(f".{os.getpid()}.tmp"), cfg_file.with_suffix(f".{os.getpid()}.tmp")
    save_file(model.state_dict(), str(tmp_weights))
    tmp_weights.replace(weights)
    tmp_cfg.write_text(json.dumps(asdict(config), indent=2))
    tmp_cfg.replace(cfg_file)
    return model.eval()
