"""`python -m unimodal.bench train`: stage-2 training tokens/s and MFU, Lightning loop vs a bare loop.

FLOPs per token = 6 * N_params + 12 * n_layers * d_model * seq_len (nanoGPT / PaLM appendix B).
Both loops train the same model on the same synthetic batches (ids laid out as real sequences:
`<bos> text <boi> codes <eoi> <eos>`); the Lightning loop is `Trainer.fit` with logging, checkpoints
and progress bar off, timed by a callback from the first timed step to the last. On a GPU the peak is
the measured bf16 matmul rate, so fp32 rows show how far they are from what bf16 autocast reaches.

    python -m unimodal.bench train --bf16                  # this CPU, the demo model
    python -m unimodal.bench train --device cuda --bf16 --n-layers 12 --d-model 768 --n-heads 12 \
        --ffn-hidden 2048 --grid 16 --codebook 1024        # GPU-sized: 256-token images, ~90M params
"""

from __future__ import annotations

import argparse
import time
import warnings

import lightning as L
import torch

from unimodal.lm.vocab import JointVocab
from unimodal.training.modules import TokenizerModule, TransformerModule, ignore_library_deprecations

from .common import (
    add_model_args,
    default_device,
    describe_peak,
    measured_peak_flops,
    model_config,
    peak_info,
    print_table,
    sync,
)


def synthetic_batches(vocab: JointVocab, batch_size: int, text_len: int, n: int, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(n):
        text = torch.randint(0, vocab.text_size, (batch_size, text_len), generator=g)
        codes = torch.randint(0, vocab.image_size, (batch_size, *vocab.image_grid), generator=g)
        ids = torch.tensor([vocab.text_to_image_sequence(t.tolist(), c) for t, c in zip(text, codes)])
        batches.append({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    return batches


def flops_per_token(module: TransformerModule, seq_len: int) -> float:
    cfg = module.hparams["model"]
    n_params = sum(p.numel() for p in module.model.parameters())
    return 6 * n_params + 12 * cfg["n_layers"] * cfg["d_model"] * seq_len


def bare_loop(
    module: TransformerModule, batches: list[dict], warmup: int, fused: bool = False, bf16: bool = False
) -> float:
    """Seconds per step of a plain PyTorch loop over the same module (forward, loss, backward, AdamW),
    on the device the module is on; `bf16` runs forward and loss under bf16 autocast."""
    device = next(module.parameters()).device
    opt = torch.optim.AdamW(module.model.parameters(), lr=1e-4, fused=fused or None)
    module.train()
    start = None
    for i, batch in enumerate(batches):
        if i == warmup:
            sync(device)
            start = time.perf_counter()
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss, _ = module._loss(batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    sync(device)
    return (time.perf_counter() - start) / (len(batches) - warmup)


class _StepTimer(L.Callback):
    def __init__(self, warmup: int):
        self.warmup, self.start, self.end, self.steps = warmup, None, None, 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == self.warmup:
            sync(pl_module.device)
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx >= self.warmup:
            sync(pl_module.device)
            self.end, self.steps = time.perf_counter(), self.steps + 1


def lightning_loop(
    module: L.LightningModule, batches: list, warmup: int, precision: str = "32-true", device: str = "cpu",
    accumulate: int = 1,
) -> float:  # fmt: skip
    """Seconds per batch of `Trainer.fit` over the same batches (no logger, checkpoints or progress bar);
    with `accumulate` k, one optimizer step every k batches (`accumulate_grad_batches`)."""
    timer = _StepTimer(warmup)
    trainer = L.Trainer(
        accelerator="gpu" if device.startswith("cuda") else "cpu", devices=1, max_steps=len(batches) // accumulate,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[timer], precision=precision, num_sanity_val_steps=0, limit_val_batches=0,
        accumulate_grad_batches=accumulate,
    )  # fmt: skip
    loader = torch.utils.data.DataLoader(batches, batch_size=None)
    with warnings.catch_warnings():
        ignore_library_deprecations()
        trainer.fit(module, train_dataloaders=loader)
    return (timer.end - timer.start) / timer.steps


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m unimodal.bench train", description=__doc__)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--text-len", type=int, default=16, help="caption tokens per sequence")
    add_model_args(p)
    p.add_argument("--grid", type=int, default=8, help="image tokens = grid^2")
    p.add_argument("--codebook", type=int, default=512)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--bf16", action="store_true", help="also time bf16 autocast (bf16-mixed)")
    p.add_argument("--compile", action="store_true", help="also time torch.compile (model.compile: true)")
    p.add_argument("--accumulate", type=int, default=None,
                   help="also time Lightning on batches of batch-size/K rows, K per optimizer step "
                        "(default 4 when it divides --batch-size; 0 = skip)")  # fmt: skip
    p.add_argument("--device", default=default_device(), help="cpu or cuda (default: cuda when available)")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if args.accumulate is None:
        args.accumulate = 4 if args.batch_size % 4 == 0 else 0
    if args.accumulate < 0:
        p.error(f"--accumulate must be >= 0 (0 or 1 = no accumulation row), got {args.accumulate}")
    if args.accumulate > 1 and args.batch_size % args.accumulate:
        p.error(f"--batch-size {args.batch_size} is not divisible by --accumulate {args.accumulate}")

    config = model_config(args, p)  # a bad size is refused before seconds of peak measurement
    device = args.device
    peak = measured_peak_flops(device)
    peak_name = "bf16 peak" if device.startswith("cuda") else "fp32 peak"
    # a CPU with bf16 units (AVX-512 BF16, AMX) multiplies bf16 several times faster than fp32: bf16
    # rows are also measured against that peak, so MFU stays a fraction of what the arithmetic allows
    bf16_peak = measured_peak_flops(device, dtype=torch.bfloat16) if args.bf16 and peak_name == "fp32 peak" else None
    vocab = JointVocab(text_size=400, image_size=args.codebook, image_grid=(args.grid, args.grid), max_text_tokens=32)
    batches = synthetic_batches(vocab, args.batch_size, args.text_len, args.steps)
    seq_len = batches[0]["input_ids"].shape[1]
    tokens = args.batch_size * seq_len

    rows = []

    def row(loop: str, seconds: float, fpt: float, batch_tokens: int = tokens, bf16: bool = False):
        """`seconds` per batch of `batch_tokens` tokens."""
        rows.append({"loop": loop, "tokens/s": batch_tokens / seconds, "step ms": 1000 * seconds,
                     f"MFU ({peak_name})": batch_tokens / seconds * fpt / peak})  # fmt: skip
        if bf16_peak:
            rows[-1]["MFU (bf16 peak)"] = batch_tokens / seconds * fpt / bf16_peak if bf16 else None

    def fresh(compile: bool = False) -> TransformerModule:
        torch.manual_seed(0)
        return TransformerModule(vocab=vocab, model=config, compile=compile).to(device)

    module = fresh()
    fpt = flops_per_token(module, seq_len)
    row("bare PyTorch", bare_loop(module, batches, args.warmup), fpt)
    row("bare PyTorch, fused AdamW", bare_loop(fresh(), batches, args.warmup, fused=True), fpt)
    row("Lightning Trainer.fit", lightning_loop(fresh(), batches, args.warmup, device=device), fpt)
    if args.bf16:
        row("bare PyTorch, bf16 autocast", bare_loop(fresh(), batches, args.warmup, bf16=True), fpt, bf16=True)
        seconds = lightning_loop(fresh(), batches, args.warmup, "bf16-mixed", device)
        row("Lightning, bf16-mixed", seconds, fpt, bf16=True)
    if args.compile:  # the warm-up steps compile
        row("bare PyTorch, torch.compile", bare_loop(fresh(compile=True), batches, args.warmup), fpt)
        row("Lightning, torch.compile", lightning_loop(fresh(compile=True), batches, args.warmup, device=device), fpt)
    if args.accumulate > 1:  # the same rows in k smaller batches per optimizer step
        k = args.accumulate
        micro = [{key: v[i : i + args.batch_size // k] for key, v in b.items()}
                 for b in batches for i in range(0, args.batch_size, args.batch_size // k)]  # fmt: skip
        seconds = lightning_loop(fresh(), micro, args.warmup * k, device=device, accumulate=k)
        row(f"Lightning, accumulate {k} (step ms: per batch of {args.batch_size // k})", seconds, fpt, tokens // k)

    images = [torch.rand(args.batch_size, 3, 32, 32) * 2 - 1 for _ in range(args.steps)]
    stage1 = lightning_loop(TokenizerModule(), images, args.warmup, device=device)
    ratio = rows[2]["tokens/s"] / rows[0]["tokens/s"]
    extra = {"device": device, "peak_flops": peak, "bf16_peak_flops": bf16_peak, "peak": peak_info(peak),
             "bf16_peak": peak_info(bf16_peak), "seq_len": seq_len,
             "flops_per_token": fpt, "lightning_over_bare": ratio,
             "stage1_images_per_s": args.batch_size / stage1}  # fmt: skip
    n_params = sum(p.numel() for p in module.model.parameters())
    also = f"; measured bf16 peak {bf16_peak / 1e9:.1f} GFLOP/s{describe_peak(bf16_peak)}" if bf16_peak else ""
    print(f"{device}: measured {peak_name} {peak / 1e9:.1f} GFLOP/s{describe_peak(peak)}{also}; "
          f"{n_params / 1e6:.1f}M params; seq_len {seq_len}; {fpt / 1e6:.2f} MFLOP/token")  # fmt: skip
    print_table(f"stage-2 training ({device})", rows, args.json, extra)
    print(f"\nLightning / bare tokens/s: {ratio:.3f}")
    print(
        f"stage-1 (default tokenizer, batch {args.batch_size}) Lightning loop: {args.batch_size / stage1:.1f} images/s"
    )
    return 0
