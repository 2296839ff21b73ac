"""The `unimodal` command: fit runs (LightningCLI), sampling, evaluation, comparison, the demo."""

from __future__ import annotations

import os
import pickle
import sys

USAGE = """usage: unimodal COMMAND ...

commands:
  tokenizer   {fit,validate} ...   stage 1: train the image tokenizer (LightningCLI; --help for options)
  transformer {fit,validate} ...   stage 2: train the transformer (LightningCLI; --help for options)
  continuous  {fit,validate} ...   stage 2 over continuous image tokens (a kl tokenizer; diffusion head)
  decoder     {fit,validate} ...   after stage 1: a diffusion decoder from codes to pixels (optional)
  decoder attach --bundle DIR --tokenizer DIR                  put a trained diffusion decoder into a bundle
  decoder compare --tokenizer DIR [--data SRC] --steps N ...   VQ vs diffusion decoder on the same codes
  sample      --bundle DIR --prompt TEXT ... --out grid.png    text-to-image sampling
  evaluate    --bundle DIR [--data SRC] --split test --json OUT  real-data metrics (FD, KID, prompt agreement), or
                                                               shapes caption fidelity; PSNR, codebook usage
  extract     --tokenizer DIR --data SRC --out DIR [--flip]    image codes once, into Parquet shards for stage 2
  caption     --bundle DIR --images FILE ... | --split test    image-to-text captions (and their accuracy)
  compare     RUN_DIR [RUN_DIR ...] --out DIR                  table + validation curves from CSV logs
  sweep       FAMILY_DIR [--dry-run]                           run an experiment family, then compare it
  reconstruct --tokenizer DIR --images PATH ... --out grid.png  image files through the tokenizer
  demo        --out DIR                                        everything above on the built-in dataset

Run `unimodal COMMAND --help` for a command's options.
"""


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    command, rest = argv[0], argv[1:]
    if command == "decoder" and rest[:1] in (["attach"], ["compare"]):
        command, rest = f"decoder {rest[0]}", rest[1:]
    if command in ("tokenizer", "transformer", "continuous", "decoder"):
        from unimodal.training import fit

        program = {"tokenizer": fit.TokenizerCLI, "transformer": fit.TransformerCLI,
                   "continuous": fit.ContinuousCLI, "decoder": fit.DecoderCLI}[command]  # fmt: skip
        try:
            program(args=rest)
        except (fit.NonFiniteLossError, ValueError, FileNotFoundError, pickle.UnpicklingError) as err:
            if os.environ.get("UNIMODAL_DEBUG"):
                raise
            message = str(err).strip().splitlines()[0]
            if isinstance(err, pickle.UnpicklingError):
                message = f"refused to load a checkpoint that is not weights-only (it holds pickled code): {message}"
            print(f"unimodal {command}: error: {message}", file=sys.stderr)
            return 1
        return 0
    commands = {
        "sample": "sample_main", "evaluate": "evaluate_main", "caption": "caption_main",
        "compare": "compare_main", "demo": "demo_main", "sweep": "sweep_main", "reconstruct": "reconstruct_main",
        "extract": "extract_main", "decoder attach": "attach_main", "decoder compare": "decoder_compare_main",
    }  # fmt: skip
    if command not in commands:
        print(f"unimodal: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
        return 2
    from unimodal.cli import commands as cmds

    try:
        return getattr(cmds, commands[command])(rest) or 0
    except (ValueError, FileNotFoundError) as err:  # user errors: one clear line (UNIMODAL_DEBUG=1: traceback)
        if os.environ.get("UNIMODAL_DEBUG"):
            raise
        print(f"unimodal {command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
