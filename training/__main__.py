"""``python -m training convert|plan|train|export`` (see training/cli.py)."""

import sys

from training.cli import main

sys.exit(main())
