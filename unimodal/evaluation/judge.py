"""The judge: a small CNN trained only on ground-truth shapes images, which reads a scene back.

For each of the four quadrants it predicts colour (or empty), shape (or empty) and size. The head
is shared by the quadrants (each sees its own 4x4 patch of the feature map), so it sees four times
the data and has no notion of which colour-shape pairs go together: held-out pairs are judged as
well as seen ones. It is trained on a fresh stream of generated scenes with every colour-shape pair
(never the images being evaluated), and cached next to the bundle.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from unimodal.cached import load_or_train
from unimodal.data.images import image_to_tensor
from unimodal.data.shapes import COLORS, POSITIONS, SHAPES, SIZES, _generate

ATTRIBUTES = {"color": list(COLORS), "shape": list(SHAPES), "size": list(SIZES)}


@dataclass
class JudgeConfig:
    resolution: int = 32
    background: str = "plain"
    train_images: int = 8000
    epochs: int = 3
    seed: int = 1234


class Judge(nn.Module):
    def __init__(self, config: JudgeConfig):
        super().__init__()
        self.config = config
        self.features = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(16),
            nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),  # (B, 64, 8, 8): each quadrant is a 4x4 patch
        )  # fmt: skip
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(64 * 16, 128), nn.ReLU())
        # one output per attribute value plus "empty" (index 0)
        self.outputs = nn.ModuleDict({k: nn.Linear(128, len(v) + 1) for k, v in ATTRIBUTES.items()})

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """images (B, 3, R, R) -> {attribute: logits (B, 4 quadrants, values + 1)}."""
        h = self._quadrants(images)  # (B*4, 128)
        return {k: out(h).view(images.shape[0], 4, -1) for k, out in self.outputs.items()}

    def _quadrants(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, 3, R, R) -> the hidden layer of each quadrant, (B * 4, 128)."""
        f = self.features(images)  # (B, 64, 8, 8)
        quads = torch.stack([f[:, :, r * 4 : r * 4 + 4, c * 4 : c * 4 + 4] for r in (0, 1) for c in (0, 1)], 1)
        return self.head(quads.flatten(0, 1))

    @torch.no_grad()
    def embed(self, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        """images -> (B, 4 * 128) features: the hidden layer of each quadrant, concatenated (for Fréchet distances)."""
        self.eval()
        return torch.cat([self._quadrants(x).view(x.shape[0], -1) for x in images.split(batch_size)])

    @torch.no_grad()
    def read(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """images -> {attribute: predicted index (B, 4)}, 0 = empty quadrant."""
        self.eval()
        return {k: v.argmax(-1) for k, v in self(images).items()}


def scene_labels(rows: list[dict]) -> dict[str, torch.Tensor]:
    """Rows with colors/shapes/sizes/positions lists -> {attribute: (B, 4) index, 0 = empty}."""
    labels = {k: torch.zeros(len(rows), 4, dtype=torch.long) for k in ATTRIBUTES}
    for i, row in enumerate(rows):
        for c, s, z, p in zip(row["colors"], row["shapes"], row["sizes"], row["positions"]):
            q = POSITIONS.index(p)
            labels["color"][i, q] = ATTRIBUTES["color"].index(c) + 1
            labels["shape"][i, q] = ATTRIBUTES["shape"].index(s) + 1
            labels["size"][i, q] = ATTRIBUTES["size"].index(z) + 1
    return labels


def describe(pred: dict[str, torch.Tensor], i: int) -> str:
    """Image i of a `Judge.read` result as text: 'top left: large red circle; bottom right: ...'."""
    parts = []
    for q, position in enumerate(POSITIONS):
        if int(pred["shape"][i, q]) == 0 and int(pred["color"][i, q]) == 0:
            continue
        words = [
            ATTRIBUTES[k][int(pred[k][i, q]) - 1] if int(pred[k][i, q]) else "?" for k in ("size", "color", "shape")
        ]
        parts.append(f"{position}: {' '.join(words)}")
    return "; ".join(parts) or "(empty)"


def scene_match(pred: dict[str, torch.Tensor], labels: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per image (B,) booleans: colour, shape, position (which quadrants hold objects) and `scene`
    (colour, shape and position all right in every quadrant)."""
    color = (pred["color"] == labels["color"]).all(1)
    shape = (pred["shape"] == labels["shape"]).all(1)
    position = ((pred["shape"] > 0) == (labels["shape"] > 0)).all(1)
    return {"color": color, "shape": shape, "position": position, "scene": color & shape & position}


def train_judge(config: JudgeConfig, progress: bool = True) -> Judge:
    torch.manual_seed(config.seed)
    rows = list(_generate("judge", config.train_images, config.resolution, 2, config.background, config.seed))
    x = torch.stack([image_to_tensor(r["image"], config.resolution) for r in rows])
    y = scene_labels(rows)
    judge = Judge(config)
    opt = torch.optim.AdamW(judge.parameters(), lr=2e-3)
    steps = config.epochs * (len(rows) // 128)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps)
    judge.train()
    for _ in tqdm(range(steps), desc="training judge", disable=not progress):
        idx = torch.randint(0, len(rows), (128,))
        # small noise so the judge does not rely on pixel-perfect ground truth
        logits = judge(x[idx] + 0.05 * torch.randn_like(x[idx]))
        loss = sum(F.cross_entropy(logits[k].flatten(0, 1), y[k][idx].flatten()) for k in ATTRIBUTES)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return judge.eval()


def load_or_train_judge(directory: str | Path, config: JudgeConfig) -> Judge:
    """Trained once per (resolution, background, ...) and cached in `directory`."""
    return load_or_train(directory, config, Judge, lambda: train_judge(config))
