"""`python -m lorakit.torchrun ARGS`: torch.distributed.run under lorakit's exit rules (train/distributed.py's
`run_torchrun`), the command `lorakit train` re-launches itself through. A module of its own, outside
`lorakit.train`, so that running it does not re-execute a module its package has already imported."""

from __future__ import annotations

import sys

from .train.distributed import run_torchrun

if __name__ == "__main__":
    raise SystemExit(run_torchrun(sys.argv[1:]))
