"""The transformer: a `transformers` causal LM (Llama by default) built from a small typed config,
and the next-token loss with per-segment weights and optional grammar masking.

Everything below the config (attention, RoPE, KV caches, `generate()`, `save_pretrained`) is the
library's. `AutoModelForCausalLM.from_pretrained(bundle/transformer)` loads it with no project code.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from unimodal.lm.grammar import SEGMENT_IMAGE, SEGMENT_TEXT, SegmentGrammar
from unimodal.lm.vocab import JointVocab


@dataclass
class TransformerConfig:
    n_layers: int = 4
    d_model: int = 192
    n_heads: int = 4
    ffn_hidden: int = 512
    dropout: float = 0.0
    rope_theta: float = 10000.0
    # key/value heads: 1 (multi-query attention) by default - as good or better than one per query
    # head in the shapes recipes, and a 4x smaller cache to read per sampling step
    # (experiments/shapes/results.md); None: n_heads (multi-head), between: grouped-query
    n_kv_heads: int | None = 1

    def __post_init__(self):
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        if min(self.n_layers, self.d_model, self.n_heads, self.ffn_hidden) <= 0:
            raise ValueError("n_layers, d_model, n_heads and ffn_hidden must be positive")
        if self.n_kv_heads is not None and (self.n_kv_heads <= 0 or self.n_heads % self.n_kv_heads):
            raise ValueError(f"n_kv_heads ({self.n_kv_heads}) must be positive and divide n_heads ({self.n_heads})")


def build_transformer(config: TransformerConfig, vocab: JointVocab) -> LlamaForCausalLM:
    hf = LlamaConfig(
        vocab_size=vocab.size,
        hidden_size=config.d_model,
        intermediate_size=config.ffn_hidden,
        num_hidden_layers=config.n_layers,
        num_attention_heads=config.n_heads,
        num_key_value_heads=config.n_kv_heads or config.n_heads,
        max_position_embeddings=vocab.max_sequence_length,
        attention_dropout=config.dropout,
        rope_theta=config.rope_theta,
        tie_word_embeddings=True,
        bos_token_id=vocab.bos,
        eos_token_id=vocab.eos,
        pad_token_id=vocab.pad,
        attn_implementation="sdpa",  # the library's scaled-dot-product attention
    )
    return LlamaForCausalLM(hf)


def sequence_loss(
    logits: torch.Tensor,
    ids: torch.Tensor,
    attention_mask: torch.Tensor,
    grammar: SegmentGrammar,
    weights: dict[str, float],
    mask_by_grammar: bool,
) -> tuple[torch.Tensor, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """Next-token cross-entropy, mixed per segment as DALL-E does: sum_s w_s * mean_s(CE) / sum_s w_s.

    logits (B, T, V), ids (B, T), attention_mask (B, T). With `mask_by_grammar` the logits of ids
    the grammar forbids at each position are -inf, so the loss is over the allowed choices only
    (the same mask sampling applies). Returns the loss and, per segment, (sum of CE, token count).
    """
    targets = ids[:, 1:]  # (B, T-1)
    logits = logits[:, :-1].float()  # (B, T-1, V)
    if mask_by_grammar:
        allowed = grammar.allowed_per_position(ids)[:, :-1]  # (B, T-1, V)
        logits = logits.masked_fill(~allowed, float("-inf"))
    valid = attention_mask[:, 1:].bool()
    ce = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none").view_as(targets)
    ce = torch.where(valid, ce, torch.zeros_like(ce))  # -inf logits at padded targets would give nan
    segments = grammar.target_segments(targets)
    parts, total, weight_sum = {}, ce.new_zeros(()), 0.0
    for name, seg in (("text", SEGMENT_TEXT), ("image", SEGMENT_IMAGE)):
        sel = valid & (segments == seg)
        s, n = ce[sel].sum(), sel.sum()
        parts[name] = (s.detach(), n)
        if n > 0 and weights.get(name, 0) > 0:
            total = total + weights[name] * s / n
            weight_sum += weights[name]
    return total / max(weight_sum, 1e-8), parts
