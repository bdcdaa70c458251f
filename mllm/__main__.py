"""`python -m mllm` = the `mllm` command."""

import sys

from mllm.cli import main

sys.exit(main())
