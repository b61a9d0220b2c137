"""imf_kernels: fused GroupNorm + SiLU, attention and MeanFlow-loss ops with tangents, on several backends.

    import imf_kernels
    y, dy = imf_kernels.group_norm_act_jvp(x, dx, 32, weight, bias)
    imf_kernels.backends()                      # which backends run here, and why not
    with imf_kernels.use_backend("torch"): ...  # or IMF_KERNELS_BACKEND=torch

`imf_kernels.reference` holds the plain-PyTorch oracle of every op.
"""

from imf_kernels.api import (
    attention,
    attention_jvp,
    group_norm_act,
    group_norm_act_jvp,
    imf_loss,
    meanflow_loss,
)
from imf_kernels.dispatch import BackendStatus, backends, current_backend, use_backend

__all__ = [
    "BackendStatus",
    "attention",
    "attention_jvp",
    "backends",
    "current_backend",
    "group_norm_act",
    "group_norm_act_jvp",
    "imf_loss",
    "meanflow_loss",
    "use_backend",
]
