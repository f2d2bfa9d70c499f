"""``python -m pyrozoo``, and ``torchrun ... -m pyrozoo train ...`` for a data-parallel run."""

import sys

from pyrozoo.cli import main

sys.exit(main())
