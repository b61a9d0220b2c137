"""Each public op on backend="triton" launches its own kernels and nothing else: no zero fills for the constant
outputs' gradients, no casts, no torch reductions next to the kernels (tests/launches.py records both; Triton runs
in the interpreter here). Every extra launch costs a GPU a few microseconds, as much as a small GroupNorm. The
cuda backend's list is in tests/test_cuda_emulated.py."""

import launches
import pytest
import torch

from imf_kernels import dispatch

GN_FWD, GN_BWD, PARAM_SUMS = "triton:_gn_fwd_kernel", "triton:_gn_bwd_kernel", "triton:_param_sums_kernel"
LOSS_FWD = ["triton:_loss_partial_kernel", "triton:_loss_finish_kernel"]
TRITON_LAUNCHES = {
    "gn.fwd": [GN_FWD],
    "gn.jvp": [GN_FWD],
    "gn.jvp-first-rows": [GN_FWD],  # one launch: the tangent part on the first samples' programs only
    "gn.bwd": [GN_BWD, PARAM_SUMS],  # grad_weight, grad_bias summed over the batch by a second kernel
    "gn.bwd-no-params": [GN_BWD],
    "gn.bwd-residual": [GN_BWD, PARAM_SUMS],  # the returned x's gradient added inside the kernel, no add of its own
    "attn.fwd": ["triton:_attn_fwd_kernel"],
    "attn.jvp": ["triton:_attn_fwd_kernel"],
    "attn.bwd": ["triton:_attn_bwd_delta_kernel", "triton:_attn_bwd_dkdv_kernel", "triton:_attn_bwd_dq_kernel"],
    "imf_loss.fwd": LOSS_FWD,
    "imf_loss.bwd": ["triton:_loss_bwd_kernel"],
    "mf_loss.fwd": LOSS_FWD,
    "mf_loss.bwd": ["triton:_loss_bwd_kernel"],
}


@pytest.fixture(scope="module")
def calls():
    if dispatch.not_supported_reasons("triton", "group_norm_act", {"x": torch.zeros(1, 8, 2, 2), "num_groups": 2}):
        pytest.skip("triton cannot run here (TRITON_INTERPRET=1 runs it on CPU)")
    return launches.op_calls("triton", torch.float16)


@pytest.mark.parametrize("name", TRITON_LAUNCHES)
def test_triton_ops_launch_their_kernels_only(name, calls):
    calls[name]()  # first calls pick and cache the launch configuration
    with launches.recorded() as launched:
        calls[name]()
    assert launched == TRITON_LAUNCHES[name]


def test_recorder_sees_the_launches_this_file_rules_out():
    """The recorder is not blind: a zero fill, a cast and a reduction are each recorded."""
    x = torch.randn(4, 3)
    with launches.recorded() as launched:
        torch.zeros(3)
        x.to(torch.float16)
        x.sum(0)
        x.view(3, 4).t()  # views launch nothing
    assert launched == ["zeros", "_to_copy", "sum"]


def test_the_fused_step_copies_no_layout(calls):
    """The fused iMF step's forward (targets and the pass with tangents) on backend="triton", with cross- and
    self-attention: FiLM's scale and shift come out contiguous (`imf.layers.film_bank`) and the attention kernels read
    the channels-first (B, heads, L, d) views as they are and write o laid out like q, so the only copies left are
    the objective's two of its targets (v_g from v_t, and again when the training forward's v completes it)."""
    import imf_kernels
    from imf.model import IMFNet, ModelConfig
    from imf.objectives import IMFObjective

    torch.manual_seed(21)
    model = IMFNet(ModelConfig(width=16, head_dim=16, context_dim=16, self_attn_resolutions=(4,)))  # 1-2 heads
    gen = torch.Generator().manual_seed(22)
    x, y = torch.randn(4, 1, 8, 8, generator=gen), torch.randint(0, 10, (4,), generator=gen)
    objective = IMFObjective()
    draws = objective.draw(x, torch.Generator().manual_seed(3))
    assert 0 < int((draws.t != draws.r).sum()) < 4  # rows with and without a tangent: both paths of the ops
    with imf_kernels.use_backend("triton"), launches.recorded() as launched:
        objective.loss_from_draws(model, x, y, draws)
    assert "triton:_attn_fwd_kernel" in launched and launched.count("triton:_gn_fwd_kernel") > 10
    assert launched.count("clone") == 2, [name for name in launched if name in ("clone", "contiguous", "_to_copy")]
