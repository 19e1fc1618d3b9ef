"""``python -m profiling``: see :mod:`profiling.cli`."""

import sys

from profiling.cli import main

sys.exit(main())
