"""``python -m mmsn.tools.train`` (console script ``mmsn-train``) from a checkout:
the code is in ``mmsn/tools/train.py``."""
import sys

from mmsn.tools.train import main

if __name__ == '__main__':
    sys.exit(main())
