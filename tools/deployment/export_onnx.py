"""``python -m mmsn.tools.export_onnx`` (console script ``mmsn-export-onnx``) from a checkout:
the code is in ``mmsn/tools/export_onnx.py``."""
import sys

from mmsn.tools.export_onnx import main

if __name__ == '__main__':
    sys.exit(main())
