"""Evaluation of a bundle on any image-caption data, offline, each number beside its ceiling and floor.

In the feature space of `features.py` (trained on the data's real training pairs only):
- Fréchet distance and KID to the split's real images of: the generated images (the model), the
  tokenizer's reconstructions of those real images (the best the pipeline can do), and as many real
  *training* images (two real samples: the floor any model can reach);
- prompt agreement: for each image, the rank of its own caption among up to 100 of the split's
  captions (R@1, R@5), for generated images, the real images (ceiling) and random training images
  (floor, chance);
- attribute accuracy for each label column the data has (style, group, ...): the classifier read on
  generated images against the labels of their captions, next to real images (ceiling) and random
  training images (floor);
- the image tokenizer on the split's real images: PSNR, SSIM, codebook usage, perplexity;
- caption dependence: the teacher-forced image loss with own against shuffled captions (`conditioning.py`).

With `rerank=N > 1`, N candidates are drawn per caption and the reranker (`generation/rerank.py`, a
contrastive scorer of its own, trained on the same training pairs) keeps the best; every metric of
the generated images is also reported for each caption's first candidate (`generated_without_rerank`,
sampling without reranking at the candidates' seeds). The scorer and the evaluation network learn the
same pairs, so read the reranked numbers as what a user of `sample --rerank` gets, not as a gain in
the model.
"""

from __future__ import annotations

import random
from pathlib import Path

import datasets
import torch

from unimodal.data.pairs import DataSource, load_pairs, readable_images
from unimodal.evaluation.conditioning import caption_dependence
from unimodal.evaluation.features import FeatureNetConfig, load_or_train_feature_net
from unimodal.evaluation.reconstruct import reconstruct
from unimodal.generation.bundle import Bundle
from unimodal.generation.rerank import rerank as keep_best
from unimodal.generation.rerank import reranker_for, sample_candidates
from unimodal.generation.sampling import SamplingParams
from unimodal.tokenizers.image import psnr, ssim, token_statistics
from unimodal.viz import make_grid

CANDIDATES = 100  # captions each image's own caption is ranked among
MAX_CLASSES = 64  # a string column with at most this many values (each seen twice) is a label


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Fréchet distance between Gaussians fitted to features a (N, D) and b (M, D), in float64."""
    a, b = a.double(), b.double()
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = torch.cov(a.T), torch.cov(b.T)
    # tr sqrt(cov_a cov_b) = tr sqrt(s cov_b s) with s = cov_a^(1/2), a symmetric PSD matrix
    w, v = torch.linalg.eigh(cov_a)
    s = v @ torch.diag(w.clamp(min=0).sqrt()) @ v.T
    cross = torch.linalg.eigvalsh(s @ cov_b @ s).clamp(min=0).sqrt().sum()
    return float((mu_a - mu_b).square().sum() + cov_a.trace() + cov_b.trace() - 2 * cross)


def kernel_inception_distance(a: torch.Tensor, b: torch.Tensor, subsets: int = 50, subset_size: int = 100,
                              seed: int = 0) -> float:  # fmt: skip
    """Unbiased MMD^2 with the cubic polynomial kernel (KID), averaged over random subsets."""
    a, b = a.double(), b.double()
    d, m = a.shape[1], min(subset_size, a.shape[0], b.shape[0])
    g = torch.Generator().manual_seed(seed)

    def k(x, y):
        return (x @ y.T / d + 1) ** 3

    total = 0.0
    for _ in range(subsets):
        x, y = a[torch.randperm(a.shape[0], generator=g)[:m]], b[torch.randperm(b.shape[0], generator=g)[:m]]
        kxx, kyy, kxy = k(x, x), k(y, y), k(x, y)
        off = (kxx.sum() - kxx.trace() + kyy.sum() - kyy.trace()) / (m * (m - 1))
        total += float(off - 2 * kxy.mean())
    return total / subsets


def recall_at(similarity: torch.Tensor, own: torch.Tensor, ks=(1, 5)) -> dict[str, float]:
    """similarity (N, P) of each image to P candidate captions; own (N,) the index of its caption."""
    rank = (similarity > similarity.gather(1, own[:, None])).sum(1)  # 0 = its own caption ranks first
    return {f"r@{k}": float((rank < k).float().mean()) for k in ks}


def label_columns(ds: datasets.Dataset) -> list[str]:
    """String columns (besides image and caption) with a few recurring values: attributes to classify."""
    out = []
    for name, feature in ds.features.items():
        if name in ("image", "text", "file_name") or not isinstance(feature, datasets.Value):
            continue
        if feature.dtype not in ("string", "large_string"):
            continue
        values = ds[name]
        classes = set(values)
        if 2 <= len(classes) <= MAX_CLASSES and len(classes) * 2 <= len(values):
            out.append(name)
    return out


def seeded_subset(n: int, k: int, seed: int) -> list[int]:
    """Indices of `k` of `n` rows, a seeded random subset in file order (all rows if `k >= n`): files are
    often sorted by class, so the first `k` would be a biased sample."""
    if n <= k:
        return list(range(n))
    return sorted(random.Random(seed).sample(range(n), k))


def feature_net_for(source: DataSource, resolution: int, directory: str | Path, **overrides):
    """The data's evaluation network, trained on its real training pairs once and cached in `directory`."""
    train = load_pairs(source, "train")
    images, keep = readable_images(train, resolution, source.background)
    train = train.select(keep)
    columns = label_columns(train)
    labels = {k: [str(v) for v in train[k]] for k in columns}
    captions = [t or "" for t in train["text"]]
    config = FeatureNetConfig.for_data(captions, labels, resolution, **overrides)
    return load_or_train_feature_net(directory, config, images, captions, labels), train, images


@torch.no_grad()
def evaluate_real(
    bundle: Bundle,
    source: DataSource,
    split: str,
    feature_dir: str | Path,
    num_captions: int = 200,
    params: SamplingParams | None = None,
    grid_path: str | Path | None = None,
    seed: int = 0,
    features: dict | None = None,
    rerank: int = 1,
    reranker_dir: str | Path | None = None,
    reranker: dict | None = None,
) -> dict:
    """Metrics of one split of `source` as a JSON-friendly dict (see the module docstring); `features`
    overrides FeatureNetConfig fields (steps, channels, ...); `rerank` candidates per caption, the reranker
    cached in `reranker_dir` (default: beside `feature_dir`), `reranker` overriding RerankerConfig fields."""
    params = params or SamplingParams()
    if rerank < 1:
        raise ValueError(f"rerank must be >= 1 candidates per caption, got {rerank}")
    resolution = bundle.image_tokenizer.config.resolution
    net, train, train_images = feature_net_for(source, resolution, feature_dir, **(features or {}))
    ds = load_pairs(source, split)
    chosen = seeded_subset(len(ds), num_captions, seed)
    ds = ds.select(chosen)
    real, keep = readable_images(ds, resolution, source.background)
    rows = ds.select(keep)
    captions = [t or "" for t in rows["text"]]
    n = len(captions)

    # floor: as many random training images (other rows than the evaluated ones when split is train)
    evaluated = set(chosen) if split == "train" else set()
    pool = [i for i in range(len(train)) if i not in evaluated]
    floor_idx = random.Random(seed).sample(pool, min(n, len(pool)))
    floor = train_images[floor_idx]

    tok = bundle.image_tokenizer
    codes, recon = reconstruct(tok, real, params.decoder, params.seed)
    stats = token_statistics(tok, codes)

    generated = sample_candidates(bundle, captions, params, rerank, f"generating {split}")  # (n * rerank, ...)
    rows_of = {"generated": generated}
    if rerank > 1:
        scorer = reranker_for(bundle, reranker_dir or Path(feature_dir).parent / "reranker", source,
                              **(reranker or {}))  # fmt: skip
        best, _ = keep_best(scorer, generated, bundle.text_tokenizer.encode_batch(captions), rerank)
        rows_of = {"generated": best, "generated_without_rerank": generated[::rerank]}
    generated = rows_of["generated"]
    if grid_path:
        make_grid(generated[:32], captions[:32], ncol=8).save(grid_path)

    feats = {name: net.embed(x) for name, x in
             (("real", real), *rows_of.items(), ("reconstructed", recon), ("real_train", floor))}  # fmt: skip
    fd = {k: frechet_distance(feats[k], feats["real"]) for k in (*rows_of, "reconstructed", "real_train")}
    kid = {k: kernel_inception_distance(feats[k], feats["real"], seed=seed) for k in fd}

    candidates = list(dict.fromkeys(captions))[:CANDIDATES]
    index = {c: i for i, c in enumerate(candidates)}
    ranked = [i for i, c in enumerate(captions) if c in index]  # images whose caption is a candidate
    own = torch.tensor([index[captions[i]] for i in ranked])
    agreement = {}
    for name in (*rows_of, "real"):
        agreement[name] = recall_at(net.similarity(feats[name][ranked], candidates), own)
    floor_ranked = [i for i in ranked if i < len(floor_idx)]
    agreement["random_train"] = recall_at(net.similarity(feats["real_train"][floor_ranked], candidates),
                                          own[: len(floor_ranked)])  # fmt: skip

    attributes = {}
    truth = {k: [str(v) for v in rows[k]] for k in net.config.labels if k in rows.column_names}
    for k, labels in truth.items():
        attributes[k] = {}
        for name in (*rows_of, "real", "real_train"):
            predicted = net.classify(feats[name])[k]
            attributes[k][name] = sum(p == t for p, t in zip(predicted, labels)) / max(len(predicted), 1)

    return {
        "data": source.name,
        "split": split,
        "num_captions": n,
        **({"rerank_candidates": rerank} if rerank > 1 else {}),
        "frechet_distance": fd,
        "kid": kid,
        "prompt_agreement": {**agreement, "candidates": len(candidates)},
        "attribute_accuracy": attributes,
        "tokenizer": {
            "psnr": float(psnr(recon, real).mean()),
            "ssim": float(ssim(recon, real).mean()),
            "codebook_usage": stats.get("codebook_usage"),
            "perplexity": stats.get("perplexity"),
        },  # fmt: skip
        "caption_dependence": caption_dependence(bundle, real, captions, seed=seed),
        "feature_space": f"FeatureNet (evaluation/features.py) trained on {len(train)} real training pairs",
        "sampling": {
            k: v for k, v in params.__dict__.items() if k in ("temperature", "top_k", "top_p", "seed", "cfg_scale")
        },  # fmt: skip
    }


def data_of(bundle: Bundle, data: str | None) -> DataSource:
    """The data to evaluate on: the bundle's own (recorded at export), checked against `data` if given."""
    recorded = DataSource.from_dict(bundle.data) if bundle.data else None
    if data is None:
        if recorded is None:
            raise ValueError("this bundle does not record the data it was trained on; pass --data (a folder, a "
                             "table of pairs, or 'shapes')")  # fmt: skip
        return recorded
    given = DataSource(name=data, background=recorded.background if recorded else DataSource.background)
    if recorded is not None and not recorded.same_data(given):
        raise ValueError(f"this bundle was trained on {recorded.name!r}, not {data!r}: its scores there would not "
                         f"mean anything. Omit --data to evaluate on its own data.")  # fmt: skip
    if recorded is not None:
        return recorded
    return given
