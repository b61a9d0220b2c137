"""The launcher interface every backend implements, one module per op family.

A backend is a package `imf_kernels/<backend>/` with modules `group_norm`, `attention` and `loss`, each
exposing the functions below with exactly these signatures. The public ops in `imf_kernels.api` wrap them in
autograd Functions that are the same for every backend, so a new backend is new launcher files plus one
registry line in `imf_kernels.dispatch`.

Besides the launchers, each family module exposes
    not_supported_reasons(op, args) -> list[str]
where `op` is the public op name (`group_norm_act`, `group_norm_act_jvp`, `attention`, `attention_jvp`,
`imf_loss`, `meanflow_loss`) and `args` the public op's arguments by name (tensors and options); an empty list
means the launcher takes the call, otherwise each string says in words why not (xformers-style), e.g.
"attention: Lk=5000 > 4096 supported by triton". And each backend package's `__init__.py` exposes
    unavailable_reason() -> str | None        # None when the backend can run here, else why not
    not_supported_reasons(op, args) -> list[str]   # delegates to the family module
and may set `TAKES_EVERY_CALL = True` when it runs everywhere and takes every call that passes the public checks
(`torch`): `imf_kernels.dispatch` then selects it without asking (a few microseconds less per call).

Conventions shared by every launcher:
- inputs arrive validated by `imf_kernels.api` (rank, dtype, device, contiguity, shapes); launchers still
  assert the rules only their hardware enforces (e.g. Triton: tl.dot dims >= 16, power-of-2 blocks);
- contiguity: group_norm and loss inputs are contiguous. The public group_norm ops also take channels-last maps
  (`torch.channels_last`) and return their maps (y, dy; grad_x) laid out as x is: a family module that sets
  `CHANNELS_LAST = True` gets them as they are (x, dx, grad_y and grad_residual all in x's layout), the others
  contiguous copies (and the op lays their outputs out channels-last again). The public attention ops take q,
  k, v (and tangents) of any strides; a family module that sets `STRIDED_INPUTS = True` gets them (and grad_o)
  as they are, the others contiguous (the op copies what is not);
- tangent rows: the public `*_jvp` ops take a tangent on the first m <= B samples only (dx, dscale, dshift
  of m rows; dq, dk, dv of m rows), returning a tangent of m rows. A family module that sets
  `TANGENT_ROWS = True` gets such calls as they are (its y / o and statistics cover all B samples); for the
  others the op runs the jvp launcher on the first m samples and the primal launcher on the rest;
- outputs have the dtype of `x` / `q` / `u`; saved statistics (mean, rstd, lse) and per-sample losses are
  float32; accumulation is float32 for every input dtype (float16, bfloat16, float32; the `torch` backend also
  takes float64 and then keeps statistics, losses and accumulation in float64);
- optional arguments are `None` when absent, and the matching gradient is returned as `None`;
- kernel backends launch their own kernels and nothing else: no cast, fill, sum or other torch op beside them
  (each costs a GPU launch of a few microseconds, the size of a small GroupNorm); `tests/test_launches.py`
  and `tests/test_cuda_emulated.py` list every op's launches.

group_norm (DESIGN 4.3), x: (B, C, H, W), G = num_groups divides C, weight/bias: (C,), scale/shift: (B, C):
    y = act(h), h = (GN(x) * weight + bias) * (1 + scale) + shift, act in {"silu", "none"}

    gn_act_fwd(x, num_groups, weight, bias, scale, shift, eps, act) -> (y, mean, rstd)
        mean, rstd: (B, G) float32
    gn_act_jvp_fwd(x, dx, num_groups, weight, bias, scale, shift, dscale, dshift, eps, act)
        -> (y, dy, mean, rstd)          # dscale/dshift may be None (zero tangent)
    gn_act_bwd(grad_y, x, num_groups, weight, bias, scale, shift, mean, rstd, act, grad_residual=None)
        -> (grad_x, grad_weight, grad_bias, grad_scale, grad_shift)   # None where the input is None
        grad_residual: None or x's shape, dtype and layout: a gradient of x from another branch (a residual
        connection's), added into grad_x as it is written (kernel backends: no launch of its own)

attention (DESIGN 4.3), q: (B, H, Lq, D), k, v: (B, H, Lk, D); s = scale * q k^T, p = softmax(s), o = p v:
    attention_fwd(q, k, v, scale) -> (o, lse)                 # lse: (B, H, Lq) float32, log-sum-exp of s
    attention_jvp_fwd(q, k, v, dq, dk, dv, scale) -> (o, do, lse)   # dk/dv may be None (zero tangent)
    attention_bwd(grad_o, q, k, v, o, lse, scale) -> (grad_q, grad_k, grad_v)

loss (DESIGN 2.2 / 2.3), u, du, v, v_target: (B, ...) same shape; t, r: (B,) float32;
per-sample sums over all non-batch dims; weights w = 1 / (L + c)^p are constants (stop-gradient). The forward
launchers also return the batch totals the public op needs (its loss and its stats), so it adds no kernel;
per-sample outputs and totals are float32 (float64 for float64 inputs on the torch backend, as every statistic):
    imf_loss_fwd(u, du, v, v_target, t, r, c, p) -> (loss_u, loss_v, w_u, w_v, totals)
        loss_u, loss_v, w_u, w_v: (B,); totals: (3,)
        V = u + (t - r) du;  loss_u = sum((V - v_target)^2);  loss_v = sum((v - v_target)^2)
        totals = [mean_b(w_u * loss_u + w_v * loss_v), mean_b(loss_u), mean_b(loss_v)]
    imf_loss_bwd(grad_total, u, du, v, v_target, t, r, w_u, w_v) -> (grad_u, grad_v)
        grad_total: 0-d float32 tensor (gradient of totals[0]); grad_u = grad_total * 2 w_u (V - v_target) / B
    meanflow_loss_fwd(u, du, v_target, t, r, c, p) -> (loss, w, totals)
        loss, w: (B,); totals: (2,)
        u_tgt = v_target - clip(t - r, 0, 1) du;  loss = sum((u - u_tgt)^2)
        totals = [mean_b(w * loss), mean_b(loss)]
    meanflow_loss_bwd(grad_total, u, du, v_target, t, r, w) -> grad_u
"""
