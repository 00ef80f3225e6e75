"""Without a GPU, Triton kernels run in Triton's interpreter on CPU tensors. The variable
must be set before any kernel module is imported; the kernels are imported lazily."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault('TRITON_INTERPRET', '1')
