"""Root pytest configuration for tests/ and bench/.

TRITON_INTERPRET must be set before any Triton kernel module is imported, so it is set here,
at collection time, whenever no CUDA device is present (CPU CI runs the Triton code in the
interpreter at small shapes).
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
