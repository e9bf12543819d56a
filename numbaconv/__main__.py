"""``python -m numbaconv``: the same command line as ``numbaconv`` (see :mod:`numbaconv.cli`)."""

import sys

from .cli import main

sys.exit(main())
