"""Test-suite setup. Without a GPU, Triton's kernels run through its interpreter (tests/test_kernels.py);
the switch must be set before triton is first imported, hence here. Nothing routes other CPU work through
the kernels (r1lab.model.kernels.CPU_INTERPRET stays off outside those tests)."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
