"""Reranking: a small CLIP-style image-text scorer, trained here on the bundle's training pairs.

Generate N candidates per prompt, score each (image, prompt) pair by the cosine similarity of
their embeddings, keep the best k (DALL-E's CLIP reranking, at the scale of a CPU-sized dataset).
The scorer reads pixels and the bundle's own BPE ids; it is trained once with a symmetric InfoNCE
loss on the train split of the data the bundle records (the built-in shapes when it records none,
or shapes) and cached next to the bundle, keyed by its config, the data and the tokenizer.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from unimodal.cached import load_or_train
from unimodal.data.images import images_to_tensor
from unimodal.data.pairs import DataSource, load_pairs, readable_images
from unimodal.data.shapes import ShapesConfig
from unimodal.generation.sampling import SamplingParams


@dataclass
class RerankerConfig:
    resolution: int = 32
    text_size: int = 1024  # BPE vocabulary size (ids past it are the padding id)
    max_text_tokens: int = 32
    dim: int = 128
    text_layers: int = 2
    train_pairs: int = 20000  # shapes: pairs generated to train on (other data: all its training pairs)
    epochs: int = 4
    min_steps: int = 200  # other data than shapes: at least this many steps however few its pairs
    input_size: int = 32  # larger images are average-pooled to this side first (64x64 costs what 32x32 does)
    batch_size: int = 256
    lr: float = 2e-3
    seed: int = 1234
    tokenizer_digest: str = ""  # which text tokenizer the ids come from: another one retrains
    data: dict | None = None  # DataSource.to_dict() of the pairs to learn; None: the built-in shapes


class ContrastiveScorer(nn.Module):
    def __init__(self, config: RerankerConfig):
        super().__init__()
        self.config = config
        d = config.dim
        self.image = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(4),
            nn.Flatten(), nn.Linear(64 * 16, d), nn.ReLU(), nn.Linear(d, d),
        )  # fmt: skip  # position matters, so the 4x4 map is flattened, not pooled away
        self.embed = nn.Embedding(config.text_size + 1, d, padding_idx=config.text_size)
        self.position = nn.Parameter(torch.zeros(config.max_text_tokens, d))
        layer = nn.TransformerEncoderLayer(d, 4, 2 * d, dropout=0.0, batch_first=True, norm_first=True)
        self.text = nn.TransformerEncoder(layer, config.text_layers, enable_nested_tensor=False)
        self.text_out = nn.Linear(d, d)
        self.logit_scale = nn.Parameter(torch.tensor(2.659))  # log(1 / 0.07), as CLIP starts

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, R, R) in [-1, 1] -> unit embeddings (B, dim)."""
        return F.normalize(self.image(self.shrink(images)), dim=-1)

    def shrink(self, images: torch.Tensor) -> torch.Tensor:
        size = self.config.input_size
        return F.adaptive_avg_pool2d(images, size) if images.shape[-1] > size else images

    def encode_text(self, ids: torch.Tensor) -> torch.Tensor:
        """Padded BPE ids (B, T) -> unit embeddings (B, dim), mean over the non-pad tokens."""
        pad = ids == self.config.text_size
        h = self.text(self.embed(ids) + self.position[: ids.shape[1]], src_key_padding_mask=pad)  # (B, T, d)
        keep = (~pad).unsqueeze(-1).float()
        return F.normalize(self.text_out((h * keep).sum(1) / keep.sum(1).clamp(min=1)), dim=-1)

    def pad_text(self, token_lists: list[list[int]]) -> torch.Tensor:
        t = self.config.max_text_tokens
        ids = torch.full((len(token_lists), t), self.config.text_size, dtype=torch.long)
        for i, tokens in enumerate(token_lists):
            tokens = tokens[:t]
            ids[i, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
        return ids

    @torch.no_grad()
    def score(self, images: torch.Tensor, token_lists: list[list[int]]) -> torch.Tensor:
        """Cosine similarity of each image with its own caption: (B,)."""
        self.eval()
        return (self.encode_images(images) * self.encode_text(self.pad_text(token_lists))).sum(-1)


def training_pairs(config: RerankerConfig) -> tuple[torch.Tensor, list[str]]:
    """The images (N, 3, R, R) and captions the scorer learns: `train_pairs` generated shapes, or every
    readable, captioned training pair of `config.data`."""
    if config.data is None:
        shapes = ShapesConfig(resolution=config.resolution, train_size=config.train_pairs)
        ds = load_pairs(DataSource(name="shapes", shapes=shapes), "train")
        return images_to_tensor(ds["image"], config.resolution), list(ds["text"])
    source = DataSource.from_dict(config.data)
    ds = load_pairs(source, "train")
    images, keep = readable_images(ds, config.resolution, source.background)
    texts = ds.select(keep)["text"]
    captioned = [i for i, t in enumerate(texts) if t]
    if not captioned:
        raise ValueError(f"{source.name!r} has no readable captioned training pairs to train the reranker on")
    return images[captioned], [texts[i] for i in captioned]


@torch.enable_grad()  # also when called under no_grad (an evaluation that reranks)
def train_reranker(config: RerankerConfig, text_tokenizer, progress: bool = True) -> ContrastiveScorer:
    torch.manual_seed(config.seed)
    images, captions = training_pairs(config)
    model = ContrastiveScorer(config)
    images = model.shrink(images)  # once, not at every step
    texts = model.pad_text(text_tokenizer.encode_batch(captions))
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=0.01)
    n, batch = len(captions), min(config.batch_size, len(captions))
    steps = config.epochs * (n // batch)
    if config.data is not None:  # a small real dataset: enough steps to learn it
        steps = max(steps, config.min_steps)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=config.lr, total_steps=steps)
    model.train()
    for _ in tqdm(range(steps), desc="training reranker", disable=not progress):
        idx = torch.randint(0, n, (batch,))
        x = images[idx] + 0.05 * torch.randn_like(images[idx])  # generated images are not pixel-perfect
        logits = model.logit_scale.exp().clamp(max=100) * model.encode_images(x) @ model.encode_text(texts[idx]).T
        target = torch.arange(len(idx))
        loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return model.eval()


def load_or_train_reranker(directory: str | Path, config: RerankerConfig, text_tokenizer) -> ContrastiveScorer:
    """Trained once per config (and text tokenizer) and cached in `directory`, like the judge."""
    return load_or_train(directory, config, ContrastiveScorer, lambda: train_reranker(config, text_tokenizer))


def reranker_for(bundle, directory: str | Path, source: DataSource | None = None, **overrides) -> ContrastiveScorer:
    """The scorer for a bundle's resolution and text tokenizer, trained on `source` (default: the data the
    bundle records) and cached in `directory`."""
    import hashlib

    data = source.to_dict() if source is not None else bundle.data
    data = data if data and data.get("name") != "shapes" else None

    tokenizer_json = bundle.text_tokenizer.tokenizer.to_str()
    config = RerankerConfig(
        resolution=bundle.image_tokenizer.config.resolution,
        text_size=bundle.vocab.text_size,
        max_text_tokens=bundle.vocab.max_text_tokens,
        tokenizer_digest=hashlib.sha256(tokenizer_json.encode()).hexdigest()[:16],
        data=data,
        **overrides,
    )
    return load_or_train_reranker(directory, config, bundle.text_tokenizer)


def rerank(
    scorer: ContrastiveScorer, images: torch.Tensor, prompts_ids: list[list[int]], candidates: int, keep: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (P * N, 3, H, W) grouped by prompt (N candidates each) -> the best `keep` per prompt
    (P * keep, 3, H, W), best first, and the chosen candidate indices (P, keep)."""
    if not 1 <= keep <= candidates:
        raise ValueError(f"keep must be in 1..{candidates} (the number of candidates), got {keep}")
    if images.shape[0] != len(prompts_ids) * candidates:
        raise ValueError(f"expected {len(prompts_ids)} prompts x {candidates} candidates, got {images.shape[0]} images")
    repeated = [ids for ids in prompts_ids for _ in range(candidates)]
    scores = scorer.score(images, repeated).view(len(prompts_ids), candidates)  # (P, N)
    best = scores.topk(keep, dim=1).indices  # (P, keep)
    flat = (best + torch.arange(len(prompts_ids)).unsqueeze(1) * candidates).flatten()
    return images[flat], best


def sample_candidates(bundle, captions: list[str], params: SamplingParams, candidates: int, desc: str) -> torch.Tensor:
    """`candidates` images per caption (len(captions) * candidates, 3, R, R), grouped by caption: batch_size //
    candidates captions per generate() call, each call seeded with params.seed + the index of its first caption."""
    images = []
    per_call = max(1, params.batch_size // candidates)
    for start in tqdm(range(0, len(captions), per_call), desc=desc):
        chunk = SamplingParams(**{**params.__dict__, "seed": params.seed + start, "images_per_prompt": candidates})
        images.append(bundle.generate(captions[start : start + per_call], chunk))
    return torch.cat(images)
