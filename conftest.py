"""Root pytest configuration for tests/ and bench/.

TRITON_INTERPRET must be set before any Triton kernel module is imported, so it is set here,
at collection time, whenever no CUDA device is present (CPU CI runs the Triton code in the
interpreter at small shapes). On a GPU machine the Triton test files put their tensors on CUDA
themselves, so the same tests run the compiled kernels there.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
