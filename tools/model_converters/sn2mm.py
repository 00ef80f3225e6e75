"""``python -m mmsn.tools.sn2mm`` (console script ``mmsn-sn2mm``) from a checkout:
the code is in ``mmsn/tools/sn2mm.py``."""
import sys

from mmsn.tools.sn2mm import main

if __name__ == '__main__':
    sys.exit(main())
