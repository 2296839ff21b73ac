"""Next-scale prediction (VAR, Tian et al. 2024) on the joint sequence: the layout of the image segment,
the block-causal attention mask, and the teacher-forced inputs of the transformer.

The stored sequence is the raster one, `<bos> text <boi> c_1 ... c_N <eoi> <eos>`, with the image's
N = sum s_k^2 codes ordered scale by scale (`JointVocab.image_scales`). As in every causal LM, the output
at position t predicts id t+1, so the loss and the grammar (`sequence_loss`, `SegmentGrammar`) are the
raster ones. What changes is what the model reads and sees at the positions that predict the image:

    position predicts     <boi>: scale 1 (one code)   then s_k^2 positions per scale k >= 2
    input (query)         <boi>                        scale k-1's codes, nearest-upsampled to s_k x s_k,
                                                       plus the embedding of level id k
    attends to            the prefix and every position of its own and earlier blocks

so all s_k^2 codes of scale k are predicted at once, from the prefix and the coarser scales only. The
last code's position (its input is that code) predicts <eoi>, and <eoi> predicts <eos>, causally.

The queries are token ids, where VAR feeds the embedding of the running continuous reconstruction
upsampled to the next scale: so the transformer stays a plain token model (its one embedding table
holds the codes and the level ids, saved by `save_pretrained`), stage 2 needs none of stage 1's
weights, and sampling feeds back the ids it has just drawn. The reconstruction's information is still
there: a query block sees every coarser scale's codes through attention.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from unimodal.lm.vocab import JointVocab


class ScaleLayout:
    """Where each scale sits in the image segment, for a vocabulary with `image_scales`.

    `scale_of[j]`: the scale of code j (0-based, j < N); `parent[j]`: the index of the code of scale
    k-1 whose nearest-upsampled copy is the input that predicts code j (-1 for the first scale)."""

    def __init__(self, vocab: JointVocab):
        if vocab.image_scales is None:
            raise ValueError("this vocabulary has no image_scales: it is a raster (next-token) layout")
        self.vocab = vocab
        self.scales = vocab.image_scales
        self.tokens = vocab.image_tokens
        sizes = [s * s for s in self.scales]
        self.starts = [sum(sizes[:k]) for k in range(len(sizes))]
        self.scale_of = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))  # (N,)
        parent = [torch.full((1,), -1)]
        for k in range(1, len(self.scales)):
            grid = torch.arange(sizes[k - 1], dtype=torch.float32).view(1, 1, self.scales[k - 1], self.scales[k - 1])
            up = F.interpolate(grid, size=(self.scales[k], self.scales[k]), mode="nearest").long().flatten()
            parent.append(self.starts[k - 1] + up)
        self.parent = torch.cat(parent)  # (N,)

    def upsample(self, ids: torch.Tensor, k: int) -> torch.Tensor:
        """Scale k-1's ids (B, s_{k-1}^2) -> the queries of scale k (B, s_k^2): each cell's parent id."""
        local = self.parent[self.starts[k] : self.starts[k] + self.scales[k] ** 2] - self.starts[k - 1]
        return ids[:, local.to(ids.device)]


def boi_positions(ids: torch.Tensor, vocab: JointVocab) -> torch.Tensor:
    """ids (B, T) -> (B,) index of each row's first <boi> (T where a row has none)."""
    is_boi = ids == vocab.boi
    first = is_boi.int().argmax(-1)
    return torch.where(is_boi.any(-1), first, torch.full_like(first, ids.shape[1]))


def position_blocks(boi: torch.Tensor, scales: tuple[int, ...], length: int) -> torch.Tensor:
    """Each position's attention block: boi (B,) <boi> indices, scales, sequence length T -> (B, T) int64,
    non-decreasing along a row. Positions up to <boi> are their own blocks (causal); the s_k^2 positions that
    predict scale k (k >= 2) share one; the positions after the image are their own blocks again."""
    sizes = torch.tensor([s * s for s in scales], device=boi.device)
    n, levels = int(sizes.sum()), len(scales)
    scale_of = torch.repeat_interleave(torch.arange(levels, device=boi.device), sizes)  # (N,)
    t = torch.arange(length, device=boi.device)[None]  # (1, T)
    b = boi[:, None]  # (B, 1)
    j = (t - b).clamp(0, n - 1)  # the code each image position predicts
    image = b + scale_of[j]  # (B, T)
    after = t - (n - levels)  # shifts the positions after the image down past the shared blocks
    return torch.where(t <= b, t, torch.where(t < b + n, image, after))


def block_causal_mask(blocks: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """(B, T) blocks (and (B, T) padding mask, 1 = a token) -> (B, 1, T, T) bool, True where query t may
    attend to key u: block[u] <= block[t] and u is a token. Every position also sees itself, so rows of
    padding stay finite under SDPA."""
    allowed = blocks[:, None, :] <= blocks[:, :, None]  # (B, T, T): [query, key]
    if attention_mask is not None:
        allowed = allowed & attention_mask.bool()[:, None, :]
    allowed = allowed | torch.eye(blocks.shape[1], dtype=torch.bool, device=blocks.device)
    return allowed[:, None]


def prefix_mask(prefix_len: int, scales: tuple[int, ...], trailing: int = 2) -> torch.Tensor:
    """The mask of one unpadded sequence: `prefix_len` ids ending at <boi>, the image, `trailing` ids after
    it -> (1, 1, T, T) bool with T = prefix_len + sum s^2 + trailing - 1 (its last id predicts nothing)."""
    length = prefix_len + sum(s * s for s in scales) + trailing
    return block_causal_mask(position_blocks(torch.tensor([prefix_len - 1]), scales, length))


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) padding mask -> RoPE positions counted from each row's first token (left or right padding)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)


def query_inputs(ids: torch.Tensor, vocab: JointVocab, layout: ScaleLayout | None = None):
    """Stored sequences (B, T), each with a whole image after its <boi> -> (input ids (B, T), level ids (B, T)
    or -1 where no level embedding is added): the image positions hold the queries of the next scale."""
    layout = layout or ScaleLayout(vocab)
    boi = boi_positions(ids, vocab)
    has_image = boi + layout.tokens < ids.shape[1]
    inputs, levels = ids.clone(), torch.full_like(ids, -1)
    rows = has_image.nonzero().flatten()
    if rows.numel():
        j = torch.arange(1, layout.tokens, device=ids.device)  # codes predicted by query positions
        at = boi[rows, None] + j  # (R, N-1): query positions
        source = boi[rows, None] + 1 + layout.parent[1:].to(ids.device)  # their parents' stored positions
        inputs[rows[:, None], at] = ids[rows[:, None], source]
        levels[rows[:, None], at] = vocab.level_offset + layout.scale_of[1:].to(ids.device)
    return inputs, levels


def embed(model, input_ids: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Token embeddings plus, where `levels` >= 0, the embedding of that level id: (B, T, D)."""
    table = model.get_input_embeddings()
    return table(input_ids) + table(levels.clamp_min(0)) * (levels >= 0)[..., None]


def forward(model, vocab: JointVocab, ids: torch.Tensor, attention_mask: torch.Tensor):
    """Teacher-forced next-scale forward over stored sequences: ids, attention_mask (B, T) -> the model's
    output (logits (B, T, V) where position t predicts ids[:, t+1], as in the raster layout)."""
    inputs, levels = query_inputs(ids, vocab)
    mask = block_causal_mask(position_blocks(boi_positions(ids, vocab), vocab.image_scales, ids.shape[1]),
                             attention_mask)  # fmt: skip
    return model(inputs_embeds=embed(model, inputs, levels), attention_mask=mask,
                 position_ids=position_ids(attention_mask))  # fmt: skip


def teacher_forced_logits(model, vocab: JointVocab, ids: torch.Tensor, attention_mask: torch.Tensor):
    """Logits (B, T, V) of stored sequences, position t predicting ids[:, t+1]: the next-scale forward when
    the vocabulary has image scales, the plain causal forward otherwise."""
    if vocab.image_scales is not None:
        return forward(model, vocab, ids, attention_mask).logits
    return model(input_ids=ids, attention_mask=attention_mask).logits


def scale_losses(logits: torch.Tensor, ids: torch.Tensor, vocab: JointVocab) -> dict[str, tuple[torch.Tensor, int]]:
    """Per-scale image loss, for validation: logits (B, T, V) of `forward`, stored ids (B, T) ->
    {"image_s{k}": (sum of cross-entropy over scale k's codes, their count)}, the softmax taken over the code
    range (what the grammar allows at every image position)."""
    layout = ScaleLayout(vocab)
    boi = boi_positions(ids, vocab)
    rows = (boi + layout.tokens < ids.shape[1]).nonzero().flatten()
    at = boi[rows, None] + torch.arange(layout.tokens, device=ids.device)  # (R, N): positions predicting codes
    codes = vocab.ids_to_codes(ids[rows[:, None], at + 1])  # (R, N)
    image = logits[rows[:, None], at][..., vocab.image_offset : vocab.special_offset].float()  # (R, N, K)
    ce = F.cross_entropy(image.flatten(0, 1), codes.flatten(), reduction="none").view_as(codes)
    return {
        f"image_s{k}": (ce[:, start : start + s * s].sum().detach(), rows.numel() * s * s)
        for k, (start, s) in enumerate(zip(layout.starts, layout.scales, strict=True))
    }
