"""The README's Python examples run as written, each on its own (a user copies one block)."""

import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parent.parent / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_the_three_examples():
    blocks = python_blocks()
    assert len(blocks) == 3
    assert "objective.loss(" in blocks[0] and "sample(" in blocks[0]
    assert "train(" in blocks[1] and "load_model(" in blocks[1]
    assert "import imf_kernels as K" in blocks[2]


def test_training_and_sampling_example_runs():
    scope: dict = {}
    exec(compile(python_blocks()[0], "README.md", "exec"), scope)
    assert torch.isfinite(scope["loss"]) and scope["loss"].ndim == 0
    assert scope["images"].shape == (16, 1, 8, 8) and torch.isfinite(scope["images"]).all()
    assert all(p.grad is not None for p in scope["model"].parameters() if p.requires_grad)


def test_library_training_example_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    scope: dict = {}
    exec(compile(python_blocks()[1], "README.md", "exec"), scope)
    assert scope["run"].trainer.step_count == 50 and len(scope["run"].history) == 50
    model, trained = scope["model"], scope["run"].trainer.ema.model
    assert not model.training
    assert all(
        torch.equal(a, b) for a, b in zip(model.state_dict().values(), trained.state_dict().values(), strict=True)
    )
    assert scope["images"].shape == (10, 1, 8, 8) and torch.isfinite(scope["images"]).all()


def test_kernel_example_runs():
    scope: dict = {}
    exec(compile(python_blocks()[2], "README.md", "exec"), scope)
    assert scope["dy"].shape == scope["x"].shape
    assert torch.equal(scope["x_out"], scope["x"]) and scope["out"].shape == scope["x"].shape
    scope["out"].sum().backward()  # through the residual and the norm: one gradient of x
    assert torch.isfinite(scope["x"].grad).all()
    assert scope["do"].shape == (2, 4, 256, 32) and scope["o"].shape == (3, 4, 256, 32)
