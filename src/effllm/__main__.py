import sys

from effllm.cli import main

sys.exit(main())
