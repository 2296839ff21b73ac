"""A stage-1 fit, then a stage-2 fit, in one pair of DDP processes (what `python -m unimodal tokenizer fit
...` and `python -m unimodal transformer fit ...` with `--trainer.strategy ddp` do one after the other, for
one start of the processes). Lightning starts rank 1 by running this command again; the second fit finds the
process group of the first.

    python -m tests.training.ddp_pair '{"tokenizer": [...], "transformer": [...]}'
"""

import json
import sys

from unimodal.training.fit import TokenizerCLI, TransformerCLI

if __name__ == "__main__":
    args = json.loads(sys.argv[1])
    TokenizerCLI(args=args["tokenizer"])
    TransformerCLI(args=args["transformer"])
