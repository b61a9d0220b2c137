"""The bench tests alone (`pytest bench`) set up as the suite does (tests/conftest.py): without a GPU, Triton
runs through its interpreter, which must be switched on before `triton` is first imported."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
