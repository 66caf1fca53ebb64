"""``python -m benchmarks.routing``: see ``benchmarks/routing/loop.py``."""

import sys

from benchmarks.routing.loop import main

sys.exit(main())
