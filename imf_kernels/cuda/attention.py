"""cuda launchers of short-context cross-attention (csrc/attention.cu); interface in imf_kernels.interface.

o = softmax(scale q k^T) v with the context (Lk <= 64 tokens: K, V, dK, dV) in shared memory, one query row
per warp. Memory floor: read q (and dq) once, write o (and do) and lse once; K and V are tiny.
"""

from typing import Any

import torch

from imf_kernels.cuda import _common

HEAD_DIMS = (32, 64, 128)
MAX_LK = 64
ROWS_PER_BLOCK = 64  # forward: query rows of one block (csrc/attention.cu kRowsPerBlock)
MIN_ROWS_PER_SPLIT = 64  # backward: fewer rows per block would repeat the K/V staging for little work
MAX_GRID_X = 2**31 - 1
MAX_GRID_Y = 65535
# dq, dk and dv may cover the first m <= B samples only: the jvp kernel runs on those samples and the primal kernel
# on the rest, into one o and lse (`imf_kernels.interface`)
TANGENT_ROWS = True


def not_supported_reasons(op: str, args: dict[str, Any]) -> list[str]:
    """Why the cuda kernels cannot take this call (devices and dtypes are checked by the package)."""
    q, k = args.get("q"), args.get("k")
    if not (isinstance(q, torch.Tensor) and isinstance(k, torch.Tensor) and q.dim() == 4 and k.dim() == 4):
        return [f"{op}: q and k must be 4-D (B, H, L, D)"]
    reasons = []
    batch, heads, lq, head_dim = q.shape
    lk = k.shape[2]
    if head_dim not in HEAD_DIMS:
        reasons.append(f"{op}: head dim D={head_dim} not supported by cuda ({', '.join(map(str, HEAD_DIMS))})")
    if not 1 <= lk <= MAX_LK:
        reasons.append(f"{op}: Lk={lk} not supported by cuda (1 to {MAX_LK} context tokens, in shared memory)")
    if batch * heads > MAX_GRID_X:
        reasons.append(f"{op}: B * H={batch * heads} > {MAX_GRID_X} blocks")
    if -(-lq // ROWS_PER_BLOCK) > MAX_GRID_Y:
        reasons.append(f"{op}: Lq={lq} > {MAX_GRID_Y * ROWS_PER_BLOCK} supported by cuda")
    if not reasons and q.is_cuda and torch.cuda.is_available():
        extension = _common.extension()
        tangent = op == "attention_jvp"
        has_dk = tangent and args.get("dk") is not None
        has_dv = tangent and args.get("dv") is not None
        needed = max(
            extension.attention_fwd_smem_bytes(lk, head_dim, tangent, has_dk, has_dv),
            extension.attention_bwd_smem_bytes(lk, head_dim),
        )
        available = _common.smem_optin_bytes(q.device)
        if needed > available:
            reasons.append(
                f"{op}: Lk={lk}, D={head_dim} needs {needed} bytes of shared memory per block, "
                f"{q.device} allows {available}"
            )
    return reasons


def _forward(q, k, v, dq, dk, dv, scale):
    batch = q.shape[0]
    rows = batch if dq is None else dq.shape[0]
    o = _common.empty(tuple(q.shape), q.dtype, q.device)
    do = None if dq is None else _common.empty(tuple(dq.shape), q.dtype, q.device)
    lse = _common.empty(tuple(q.shape[:3]), torch.float32, q.device)
    for span, tangent in _common.tangent_row_spans(batch, rows):
        dq_, dk_, dv_, do_ = (dq, dk, dv, do) if tangent else (None, None, None, None)
        _common.extension().attention_fwd(
            q[span], k[span], v[span], dq_, dk_, dv_, float(scale), o[span], do_, lse[span]
        )
    return o, do, lse


def attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(o, lse); lse (B, H, Lq) float32, the log-sum-exp of s = scale q k^T."""
    o, _, lse = _forward(q, k, v, None, None, None, scale)
    return o, lse


def attention_jvp_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    dq: torch.Tensor,
    dk: torch.Tensor | None,
    dv: torch.Tensor | None,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(o, do, lse) in one pass; dk/dv None are zero tangents. dq (dk, dv) of m < B rows: do has m rows, o and lse
    all B (the primal kernel on the other samples)."""
    return _forward(q, k, v, dq, dk, dv, scale)


def num_splits(batch_heads: int, lq: int, device: torch.device) -> int:
    """Blocks of query rows per (batch, head) in the backward: about two waves of blocks over the SMs,
    each block at least MIN_ROWS_PER_SPLIT rows."""
    sm_count = _common.multiprocessor_count(device)
    wanted = -(-2 * sm_count // batch_heads)
    return max(1, min(wanted, -(-lq // MIN_ROWS_PER_SPLIT), MAX_GRID_Y))


def attention_bwd(
    grad_o: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    o: torch.Tensor,
    lse: torch.Tensor,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad_q, grad_k, grad_v).

    `o` is not read: the kernel forms Delta_i = grad_o_i . o_i as sum_j P_ij dP_ij from its fp32 P and dP,
    which is the same number without the rounding of o to fp16/bf16. Each block of query rows writes float32
    partial grad_k, grad_v, which a second launch sums over the splits in order (deterministic, no atomics).
    """
    batch, heads, lq, head_dim = q.shape
    lk = k.shape[2]
    splits = num_splits(batch * heads, lq, q.device)
    grad_q = _common.empty(tuple(q.shape), q.dtype, q.device)
    grad_k_partial = _common.empty((batch * heads, splits, lk, head_dim), torch.float32, q.device)
    grad_v_partial = _common.empty((batch * heads, splits, lk, head_dim), torch.float32, q.device)
    grad_k = _common.empty(tuple(k.shape), k.dtype, k.device)
    grad_v = _common.empty(tuple(v.shape), v.dtype, v.device)
    _common.extension().attention_bwd(
        grad_o, q, k, v, lse, float(scale), grad_q, grad_k_partial, grad_v_partial, grad_k, grad_v
    )
    return grad_q, grad_k, grad_v
