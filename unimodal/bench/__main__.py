"""`python -m unimodal.bench SUBCOMMAND ...`: each subcommand lives in its own module with a `main(argv)`."""

from __future__ import annotations

import importlib
import sys

SUBCOMMANDS = {
    "tokenizer": "encode/decode images/s of image tokenizer variants",
    "sample": "text-to-image sampling images/s and MFU (uncached, KV cache, static cache; batch 1 and 64)",
    "train": "stage-2 training tokens/s and MFU (Lightning vs bare loop); stage-1 images/s",
    "data": "input pipeline samples/s vs the model's consumption rate",
    "profile": "where one training step or sampling call spends its time (torch.profiler + cProfile)",
    "bundles": "seconds per image of trained bundles side by side (any representation), over diffusion steps",
    "scale": "N synthetic pairs built, codes extracted to shards, one epoch streamed: rows/s and peak memory",
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in SUBCOMMANDS:
        print("usage: python -m unimodal.bench {" + ",".join(SUBCOMMANDS) + "} [--help] ...\n")
        for name, what in SUBCOMMANDS.items():
            print(f"  {name:10s} {what}")
        return 0 if argv[:1] in ([], ["-h"], ["--help"]) else 2
    try:
        module = importlib.import_module(f"unimodal.bench.{argv[0]}")
    except ModuleNotFoundError as err:
        if err.name != f"unimodal.bench.{argv[0]}":
            raise
        print(f"bench {argv[0]}: not implemented yet", file=sys.stderr)
        return 2
    return module.main(argv[1:]) or 0


if __name__ == "__main__":
    sys.exit(main())
