"""bench/dispatch_overhead.py: every row runs in both modes, and each variant computes what the public op does."""

import subprocess
import sys
from pathlib import Path

import torch

SCRIPT = Path(__file__).with_name("dispatch_overhead.py")


def test_every_op_runs_in_both_modes():
    """The script prints a row per op and mode (its `forward` column runs the Function's forward under no_grad,
    as apply does: in grad mode the torch launchers' out= writes would otherwise be refused)."""
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--calls", "2", "--reps", "1"], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    rows = [line.split()[:2] for line in done.stdout.splitlines()[2:]]
    ops = ["group_norm_act", "group_norm_act_jvp", "attention", "attention_jvp", "imf_loss", "meanflow_loss"]
    assert rows == [[op, mode] for mode in ("no_grad", "grad") for op in ops]


def test_the_timed_variants_return_the_public_ops_outputs():
    """public, named, apply and forward of each op give the same first output (the timed calls do the same work)."""
    sys.path.insert(0, str(SCRIPT.parent))
    import dispatch_overhead

    variants, _ = dispatch_overhead.cases()
    for op, calls in variants.items():
        first = lambda out: out[0] if isinstance(out, tuple) else out  # noqa: E731
        public = first(calls["public"]())
        for name in ("named", "apply", "forward"):
            torch.testing.assert_close(first(calls[name]()), public, rtol=0, atol=0, msg=f"{op} {name}")
