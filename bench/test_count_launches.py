"""bench/count_launches.py: the step it counts is the objective's step, and its options say what they take."""

import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).with_name("count_launches.py")


def test_a_counted_step_takes_its_bf16_weights_in_one_copy():
    """With bf16 targets the fused step's weights reach bf16 in one multi-tensor copy (no cast of a weight is left,
    tests/test_objectives.py), and the count is the step's: the same ops each time."""
    sys.path.insert(0, str(SCRIPT.parent))
    import count_launches

    bf16 = count_launches.count_step("digits", 16, 4, "torch", bf16=True, objective="imf")
    fp32 = count_launches.count_step("digits", 16, 4, "torch", bf16=False, objective="imf")
    assert bf16.count("_foreach_copy_") == 1 and fp32.count("_foreach_copy_") == 0
    assert count_launches.count_step("digits", 16, 4, "torch", bf16=True, objective="imf") == bf16
    assert "convolution" in fp32 and "convolution_backward" in fp32


def test_bf16_with_the_interpreter_is_refused():
    done = subprocess.run([sys.executable, str(SCRIPT), "--bf16"], capture_output=True, text=True)
    assert done.returncode == 2 and "--bf16 needs --backend torch" in done.stderr


@pytest.mark.parametrize("flag", ["--backend", "--objective"])
def test_unknown_choices_are_refused(flag):
    done = subprocess.run([sys.executable, str(SCRIPT), flag, "nope"], capture_output=True, text=True)
    assert done.returncode == 2 and "invalid choice" in done.stderr
