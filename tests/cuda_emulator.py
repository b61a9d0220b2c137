"""The CUDA kernels of csrc/ built against a CPU emulator of CUDA (csrc/emulation/cuda_emulation.h), so that the
cuda backend's launchers and kernels run here, on CPU tensors, under the same tests as on a GPU.

`build()` compiles csrc/emulation/*.cpp (each includes one file of csrc/ with -DIMF_EMULATE) with g++ into an
extension module with the functions of `imf_kernels._C`; `use(monkeypatch)` makes the cuda family modules call
it. Each CUDA thread is a fiber: correct barriers and warp operations are checked as they run (a deadlock,
divergent warp operations or too much shared memory is an error), and the arithmetic is the kernels' own fp32 C++
(`expf` is glibc's, not the GPU's fast path, and without FMA contraction differences). Not what a GPU shows:
speed, memory ordering between blocks, races the fibers' turn order does not expose.
"""

from __future__ import annotations

import os
import shutil
import time
import warnings
from pathlib import Path
from types import ModuleType

REPO_ROOT = Path(__file__).resolve().parents[1]
SOURCES = [
    REPO_ROOT / "csrc" / "emulation" / f"{name}.cpp"
    for name in ("group_norm", "attention", "loss", "selftest", "bindings")
]
BUILD_DIR = REPO_ROOT / "build" / "cuda_emulator"
# torch.utils.cpp_extension.load's lock file in a build folder: left behind by a build that was killed, it makes every
# later load wait for it forever. A build takes about a minute; a lock this old is such a leftover.
STALE_LOCK_SECONDS = 15 * 60
# an H100's 132 SMs would make every test-size attention backward a single split; 4 makes several
MULTIPROCESSORS = 4

_module: ModuleType | None = None


def cuda_include_dirs() -> list[str]:
    """Where cuda_fp16.h, cuda_bf16.h and driver_types.h are: $CUDA_HOME (default /usr/local/cuda), or the CUDA 13
    torch wheel's nvidia/cu13/include."""
    candidates = [Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "include"]
    try:
        import nvidia

        candidates += [Path(path) / "cu13" / "include" for path in nvidia.__path__]
    except ImportError:
        pass
    return [str(path) for path in candidates if (path / "cuda_fp16.h").exists()][:1]


def unavailable_reason() -> str | None:
    if not cuda_include_dirs():
        return "no CUDA headers (cuda_fp16.h) in $CUDA_HOME/include or the torch wheel's nvidia/cu13/include"
    if shutil.which("ninja") is None:
        return "ninja is not installed (torch.utils.cpp_extension.load needs it)"
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        return "no C++ compiler"
    return None


def build_dir() -> Path:
    """build/cuda_emulator/torch-<version>/: a module built against one torch fails to import under another
    (undefined symbols), and load() rebuilds only when a source changes."""
    import torch

    return BUILD_DIR / f"torch-{torch.__version__}"


def remove_stale_lock(directory: Path, now: float | None = None) -> bool:
    """Removes load()'s lock file in `directory` if it is older than STALE_LOCK_SECONDS (a killed build's); True if
    it did."""
    lock = directory / "lock"
    try:
        age = (time.time() if now is None else now) - lock.stat().st_mtime
    except FileNotFoundError:
        return False
    if age <= STALE_LOCK_SECONDS:
        return False
    message = f"cuda_emulator: removing {lock}, left {age / 60:.0f} minutes ago by a build that did not finish"
    warnings.warn(message, stacklevel=2)
    lock.unlink(missing_ok=True)
    return True


def build(verbose: bool = False) -> ModuleType:
    """The emulated extension, compiled on first use (about a minute: torch/extension.h), then cached in
    build/cuda_emulator/torch-<version>/ until a source changes."""
    global _module
    if _module is None:
        from torch.utils.cpp_extension import load

        directory = build_dir()
        directory.mkdir(parents=True, exist_ok=True)
        remove_stale_lock(directory)
        _module = load(
            name="imf_kernels_cuda_emulated",
            sources=[str(path) for path in SOURCES],
            extra_cflags=["-O2", "-DIMF_EMULATE", "-Wno-unknown-pragmas", "-fno-fast-math"],
            extra_include_paths=[str(REPO_ROOT / "csrc"), *cuda_include_dirs()],
            build_directory=str(directory),
            verbose=verbose,
        )
    return _module


def use(monkeypatch) -> ModuleType:
    """Points the cuda family modules at the emulated extension (and the multiprocessor count the attention
    backward splits its rows by at MULTIPROCESSORS) for one test."""
    from imf_kernels.cuda import _common

    module = build()
    monkeypatch.setattr(_common, "extension", lambda: module)
    monkeypatch.setattr(_common, "multiprocessor_count", lambda device: MULTIPROCESSORS)
    return module


def use_as_backend(monkeypatch) -> ModuleType:
    """`use`, and the `cuda` backend made available for CPU tensors, so that the public ops take backend="cuda"
    (and dispatch's cache is emptied: a selection made here must not outlive the test, the caller clears it after)."""
    import imf_kernels.cuda
    from imf_kernels import dispatch
    from imf_kernels.cuda import _common

    module = use(monkeypatch)
    monkeypatch.setattr(imf_kernels.cuda, "unavailable_reason", lambda: None)
    monkeypatch.setattr(_common, "DEVICE_TYPE", "cpu")
    dispatch.clear_cache()
    return module
