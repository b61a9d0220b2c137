"""The README's Python examples run as written: the first is self-contained; the kernel sketch gets its inputs
(x, dx, w, b, s, t of a GroupNorm layer and a conv after it; q, k, v, dq of an attention call) from a preamble
here."""

import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parent.parent / "README.md"

KERNEL_INPUTS = """
import torch
g = torch.Generator().manual_seed(0)
x, dx = torch.randn(3, 64, 5, 7, generator=g), torch.randn(3, 64, 5, 7, generator=g)
w, b, s, t = (torch.randn(*shape, generator=g) for shape in [(64,), (64,), (3, 64), (3, 64)])
q, dq = torch.randn(3, 2, 35, 16, generator=g), torch.randn(3, 2, 35, 16, generator=g)
k, v = torch.randn(3, 2, 20, 16, generator=g), torch.randn(3, 2, 20, 16, generator=g)
x.requires_grad_()
conv = torch.nn.Conv2d(64, 64, 3, padding=1)
"""


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_the_two_examples():
    blocks = python_blocks()
    assert len(blocks) == 2
    assert "objective.loss(" in blocks[0] and "sample(" in blocks[0]
    assert "import imf_kernels as K" in blocks[1]


def test_training_and_sampling_example_runs():
    scope: dict = {}
    exec(compile(python_blocks()[0], "README.md", "exec"), scope)
    assert torch.isfinite(scope["loss"]) and scope["loss"].ndim == 0
    assert scope["images"].shape == (16, 1, 8, 8) and torch.isfinite(scope["images"]).all()
    assert all(p.grad is not None for p in scope["model"].parameters() if p.requires_grad)


def test_kernel_example_runs():
    scope: dict = {}
    exec(compile(KERNEL_INPUTS + python_blocks()[1], "README.md", "exec"), scope)
    assert scope["dy"].shape == scope["x"].shape
    assert torch.equal(scope["x_out"], scope["x"]) and scope["out"].shape == scope["x"].shape
    scope["out"].sum().backward()  # through the residual and the norm: one gradient of x
    assert torch.isfinite(scope["x"].grad).all()
    assert scope["do"].shape == (2, 2, 35, 16) and scope["o"].shape == (3, 2, 35, 16)
