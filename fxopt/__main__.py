"""``python -m fxopt ...``: the ``fxopt`` command, e.g. under ``torchrun -m fxopt finetune``."""

import sys

from fxopt.cli import main

if __name__ == "__main__":
    sys.exit(main())
