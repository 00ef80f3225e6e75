"""``python -m mmsn.tools.batch_average`` (console script ``mmsn-batch-average``) from a checkout:
the code is in ``mmsn/tools/batch_average.py``."""
import sys

from mmsn.tools.batch_average import main

if __name__ == '__main__':
    sys.exit(main())
