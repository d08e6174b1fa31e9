"""``python -m fuzz``: see :mod:`fuzz.campaign`."""

import sys

from .campaign import main

sys.exit(main())
