"""bench/ncu_kernels.py's cases run (on the CPU, Triton's interpreter, fp32, batch 1): what a lease's ncu call
profiles is known to work before the lease."""

from __future__ import annotations

import ncu_kernels
import torch


def test_every_case_runs_and_counts_its_bytes():
    cases = ncu_kernels.build_cases(torch.device("cpu"), torch.float32, batch=1, loss_shape=(2, 4, 8, 8))
    assert len(cases) == 1 + len(ncu_kernels.GN_CASES) + 2
    assert cases[0][0].startswith("copy")
    for label, nbytes, call in cases:
        assert nbytes > 0, label
        call()
    # the floor of the yardstick copy is the first GroupNorm case's
    assert cases[0][1] == cases[1][1]


def test_list_needs_no_gpu(capsys):
    assert ncu_kernels.main(["--list"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == len(ncu_kernels.GN_CASES) + 1
