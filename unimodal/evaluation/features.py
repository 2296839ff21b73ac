"""A feature space for evaluating on real data, trained only on the real training pairs of that data.

No pretrained Inception or CLIP weights exist offline, so one small network is trained per dataset:
- an image encoder (a CNN, global-pooled to `dim` features): its features are the space of the
  Fréchet distance and KID;
- a bag-of-words caption encoder, trained with the image encoder contrastively (CLIP's symmetric
  InfoNCE): the image-text similarity ranks prompts (prompt agreement);
- one linear classifier per label column the data has (e.g. style, group) on the image features:
  attribute accuracy, the real-data counterpart of the shapes judge.
Words, classes and a fingerprint of the training data are part of the config, so the cache
(`load_or_train`) retrains when the data changes; training is seeded and deterministic on a CPU.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from unimodal.cached import load_or_train

UNKNOWN = 0  # word id of words never seen in training captions


def words(caption: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", caption.lower())


@dataclass
class FeatureNetConfig:
    resolution: int = 64
    channels: int = 32
    dim: int = 128
    steps: int = 800
    batch_size: int = 64
    lr: float = 2e-3
    seed: int = 0
    vocabulary: list[str] = field(default_factory=list)  # caption words, id = position + 1
    labels: dict[str, list[str]] = field(default_factory=dict)  # label column -> its classes
    data_fingerprint: str = ""

    @classmethod
    def for_data(cls, captions: list[str], labels: dict[str, list[str]], resolution: int, **overrides):
        vocabulary = sorted({w for c in captions for w in words(c)})
        digest = hashlib.sha256("\n".join(captions).encode())
        for name in sorted(labels):
            digest.update(("|" + name + ":" + ",".join(labels[name])).encode())
        classes = {name: sorted(set(values)) for name, values in labels.items()}
        fingerprint = digest.hexdigest()[:16]
        return cls(resolution=resolution, vocabulary=vocabulary, labels=classes, data_fingerprint=fingerprint,
                   **overrides)  # fmt: skip


class FeatureNet(nn.Module):
    def __init__(self, config: FeatureNetConfig):
        super().__init__()
        self.config = config
        c, layers, ch, size = config.channels, [], 3, config.resolution
        while size > 4:  # stride-2 convs down to 4x4
            layers += [nn.Conv2d(ch, c, 3, stride=2, padding=1), nn.GroupNorm(8, c), nn.SiLU()]
            ch, c, size = c, min(2 * c, 256), size // 2
        self.image = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(ch, config.dim))
        self.word_ids = {w: i + 1 for i, w in enumerate(config.vocabulary)}
        self.text = nn.EmbeddingBag(len(config.vocabulary) + 1, config.dim, mode="mean", padding_idx=UNKNOWN)
        self.text_mlp = nn.Sequential(nn.SiLU(), nn.Linear(config.dim, config.dim))
        self.logit_scale = nn.Parameter(torch.tensor(2.6593))  # log(1/0.07), CLIP's start
        self.heads = nn.ModuleDict({k: nn.Linear(config.dim, len(v)) for k, v in config.labels.items()})

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, R, R) in [-1, 1] -> (B, dim): the space of the Fréchet distance and KID."""
        return self.image(images)

    def text_features(self, captions: list[str]) -> torch.Tensor:
        ids = [[self.word_ids.get(w, UNKNOWN) for w in words(c)] or [UNKNOWN] for c in captions]
        offsets = torch.tensor([0] + [len(x) for x in ids[:-1]]).cumsum(0)
        return self.text_mlp(self.text(torch.tensor([i for x in ids for i in x]), offsets))

    @torch.no_grad()
    def embed(self, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        return torch.cat([self.image_features(x) for x in images.split(batch_size)])

    @torch.no_grad()
    def similarity(self, image_features: torch.Tensor, captions: list[str]) -> torch.Tensor:
        """(N, dim) image features x P captions -> cosine similarities (N, P)."""
        return F.normalize(image_features, dim=-1) @ F.normalize(self.text_features(captions), dim=-1).T

    @torch.no_grad()
    def classify(self, image_features: torch.Tensor) -> dict[str, list[str]]:
        return {k: [self.config.labels[k][i] for i in head(image_features).argmax(-1).tolist()]
                for k, head in self.heads.items()}  # fmt: skip


def _shift(images: torch.Tensor, g: torch.Generator, pixels: int = 4) -> torch.Tensor:
    """Random translation by up to `pixels` (edge-replicated): the only augmentation."""
    padded = F.pad(images, (pixels,) * 4, mode="replicate")
    dx, dy = torch.randint(0, 2 * pixels + 1, (2,), generator=g).tolist()
    r = images.shape[-1]
    return padded[..., dy : dy + r, dx : dx + r]


def train_feature_net(config: FeatureNetConfig, images: torch.Tensor, captions: list[str],
                      labels: dict[str, list[str]]) -> FeatureNet:  # fmt: skip
    """Contrastive image-caption training plus the label classifiers, on real training pairs only."""
    with torch.enable_grad():  # also when called under no_grad (an evaluation that trains its features first)
        return _train(config, images, captions, labels)


def _train(config, images, captions, labels) -> FeatureNet:
    torch.manual_seed(config.seed)
    g = torch.Generator().manual_seed(config.seed)
    net = FeatureNet(config)
    targets = {k: torch.tensor([config.labels[k].index(v) for v in values]) for k, values in labels.items()}
    opt = torch.optim.AdamW(net.parameters(), lr=config.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, config.lr, total_steps=config.steps, pct_start=0.1)
    n = images.shape[0]
    for _ in tqdm(range(config.steps), desc="training evaluation features", leave=False):
        idx = torch.randint(0, n, (min(config.batch_size, n),), generator=g)
        feats = net.image_features(_shift(images[idx], g))
        batch = [captions[i] for i in idx.tolist()]
        img, txt = F.normalize(feats, dim=-1), F.normalize(net.text_features(batch), dim=-1)
        logits = net.logit_scale.exp().clamp(max=100) * img @ txt.T
        same = torch.tensor([[a == b for b in batch] for a in batch], dtype=torch.float)
        target = same / same.sum(1, keepdim=True)  # repeated captions in a batch share the credit
        loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
        for k, head in net.heads.items():
            loss = loss + F.cross_entropy(head(feats), targets[k][idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return net.eval()


def load_or_train_feature_net(directory, config: FeatureNetConfig, images: torch.Tensor, captions: list[str],
                              labels: dict[str, list[str]]) -> FeatureNet:  # fmt: skip
    return load_or_train(directory, config, FeatureNet, lambda: train_feature_net(config, images, captions, labels))
