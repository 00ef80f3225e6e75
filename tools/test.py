"""``python -m mmsn.tools.test`` (console script ``mmsn-test``) from a checkout:
the code is in ``mmsn/tools/test.py``."""
import sys

from mmsn.tools.test import main

if __name__ == '__main__':
    sys.exit(main())
