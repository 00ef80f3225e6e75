"""``python -m mmsn.tools.harden_ratios`` (console script ``mmsn-harden-ratios``) from a checkout:
the code is in ``mmsn/tools/harden_ratios.py``."""
import sys

from mmsn.tools.harden_ratios import main

if __name__ == '__main__':
    sys.exit(main())
