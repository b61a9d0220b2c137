"""Build imf-kernels: the `imf` and `imf_kernels` packages, plus the `imf_kernels._C` CUDA extension where
CUDA torch and nvcc are present (see csrc/). Install with `pip install -e . --no-build-isolation`."""

from setuptools import find_packages, setup

setup(
    name="imf-kernels",
    version="0.1.0",
    description="Improved MeanFlow one-step generative models with fused Triton and CUDA kernels",
    packages=find_packages(include=["imf", "imf.*", "imf_kernels", "imf_kernels.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.11",
        "numpy",
        "scikit-learn",
        "safetensors",
        "tqdm",
        "matplotlib",
        "rich",
        "pillow",
    ],
    extras_require={"test": ["pytest", "hypothesis", "pytest-benchmark", "ruff"]},
    entry_points={"console_scripts": ["imf=imf.cli:main"]},
)
