"""`python -m gptoss_3090 ...`: the `gptoss-3090` command, for environments without its script
on PATH (notebooks, `pip install --target`)."""

import sys

from gptoss_3090.cli import main

if __name__ == "__main__":
    sys.exit(main())
