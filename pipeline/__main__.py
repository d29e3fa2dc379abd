"""``python -m pipeline``: the ``kernelmap`` command."""

import sys

from .cli import main

sys.exit(main())
