"""`--trainer.strategy fsdp_decoder`: FSDP with one shard unit per decoder layer; refused on CPUs with a message."""

import pytest
from lightning.pytorch.strategies import FSDPStrategy, StrategyRegistry
from torch.distributed.fsdp.wrap import ModuleWrapPolicy
from transformers.models.llama.modeling_llama import LlamaDecoderLayer

from unimodal.training.strategies import NAME, register_strategies


def test_fsdp_decoder_wraps_each_llama_decoder_layer():
    register_strategies()
    register_strategies()  # twice is harmless (the CLI module registers at import)
    strategy = StrategyRegistry.get(NAME)
    assert isinstance(strategy, FSDPStrategy)
    policy = strategy.kwargs["auto_wrap_policy"]  # Lightning turns the set of layer classes into this policy
    assert isinstance(policy, ModuleWrapPolicy) and set(policy._module_classes) == {LlamaDecoderLayer}


def test_fsdp_on_cpu_is_refused_with_what_to_use_instead(tmp_path):
    import lightning as L

    from unimodal.lm.vocab import JointVocab
    from unimodal.training.modules import TransformerModule

    module = TransformerModule(vocab=JointVocab(text_size=16, image_size=8, image_grid=(2, 2), max_text_tokens=4))
    trainer = L.Trainer(strategy=NAME, accelerator="cpu", devices=1, logger=False, default_root_dir=tmp_path)
    module.trainer = trainer
    with pytest.raises(ValueError, match="strategy ddp"):
        module.setup("fit")
