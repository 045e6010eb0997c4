"""`python -m effllm.train ...`: the same as `effllm train ...` (for torchrun's `-m`)."""

import sys

from effllm.cli.train import main

if __name__ == "__main__":
    sys.exit(main())
