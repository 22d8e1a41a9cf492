"""``python -m lightscale.report ...`` is ``lightscale report ...`` without importing Lightning (fast)."""

import sys

from lightscale.report.command import main

main(sys.argv[1:])
