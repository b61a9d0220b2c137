"""The environment of a child process that compiles Triton kernels (TRITON_INTERPRET removed), with the Triton
installed here or with the GPU machines' image's (a folder installed with `pip install --target`, named by
IMF_AOT_EXTRA_TRITON: `make test` installs it and sets the variable). tests/test_triton_aot.py and
tests/test_triton_launch.py run their checks under both."""

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
EXTRA_TRITON_VARIABLE = "IMF_AOT_EXTRA_TRITON"
BUILDS = ("installed", "gpu-image")


def extra_triton_version(folder: Path) -> str:
    """The version of the Triton installed (pip --target) in `folder`."""
    infos = sorted(folder.glob("triton-*.dist-info"))
    assert (folder / "triton").is_dir() and infos, f"${EXTRA_TRITON_VARIABLE}={folder} holds no Triton installation"
    return infos[-1].name.removeprefix("triton-").removesuffix(".dist-info")


def compiling_env(build: str) -> tuple[dict[str, str], str | None]:
    """(environment, the Triton version it must import or None for the installed one) for `build` in BUILDS;
    skips the calling test when the GPU image's Triton is asked for and IMF_AOT_EXTRA_TRITON is not set."""
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    paths = [str(REPO_ROOT), env.get("PYTHONPATH")]
    version = None
    if build == "gpu-image":
        extra = env.get(EXTRA_TRITON_VARIABLE)
        if not extra:
            pytest.skip(
                f"${EXTRA_TRITON_VARIABLE} is not set (`make test` installs the GPU image's Triton and sets it)"
            )
        folder = Path(extra).resolve()
        version = extra_triton_version(folder)
        paths.insert(0, str(folder))
        env["TRITON_CACHE_DIR"] = str(folder / ".cache")  # compiled kernels of one Triton version only
    env["PYTHONPATH"] = os.pathsep.join(filter(None, paths))
    return env, version
