"""Named training strategies beyond Lightning's own: `--trainer.strategy fsdp_decoder`.

FSDP shards parameters, gradients and optimizer state across processes. Its unit of sharding is
what `auto_wrap_policy` wraps; wrapping each decoder layer (as litgpt and the Hugging Face recipes
do for Llama) lets a process gather one layer's weights at a time instead of the whole model.
"""

from __future__ import annotations

from lightning.pytorch.strategies import FSDPStrategy, StrategyRegistry
from transformers.models.llama.modeling_llama import LlamaDecoderLayer

NAME = "fsdp_decoder"


def register_strategies() -> None:
    if NAME not in StrategyRegistry:
        StrategyRegistry.register(NAME, FSDPStrategy, description="FSDP with one shard unit per Llama decoder layer",
                                  auto_wrap_policy={LlamaDecoderLayer})  # fmt: skip
