"""Test-wide setup. Without a GPU, Triton kernels run through the interpreter, which must be switched on
before `triton` is first imported; tests marked `gpu` are skipped."""

import os

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture
def poison_empty():
    """NaN-fill every torch.empty while a test runs, so an element a kernel forgets to write shows up."""
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    was_warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    was_filling = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    yield
    torch.use_deterministic_algorithms(was_deterministic, warn_only=was_warn_only)
    torch.utils.deterministic.fill_uninitialized_memory = was_filling


@pytest.fixture
def one_thread():
    """One intra-op thread while a test runs: tiny models only pay synchronisation for a second one (5x slower on
    a busy 2-core machine). Files opt in with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
