"""``python -m mmsn.tools.plot_ratios`` (console script ``mmsn-plot-ratios``) from a checkout:
the code is in ``mmsn/tools/plot_ratios.py``."""
import sys

from mmsn.tools.plot_ratios import main

if __name__ == '__main__':
    sys.exit(main())
