"""Checks of bench/gpu_check.sh's control flow on a CPU: a stand-in `python` (the PYTHON variable) answers the
script's queries as a GPU machine would and records every command, so the order of the steps, the arguments each
benchmark gets and the summary are checked without a GPU. The stand-in is slow only where asked (SLOW_STEP)."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).with_name("gpu_check.sh")
NCU_SCRIPT = Path(__file__).with_name("ncu_kernels.sh")

FAKE_PYTHON = """#!/usr/bin/env bash
printf '%s\n' "$*" | head -1 >> "$CALLS"  # a multi-line -c program: its first line
case "$1" in
  -c) case "$2" in *get_device_capability*) echo 9.0 ;; *device_slug*) echo fake-gpu ;; esac ;;
  bench/step.py) [[ "$*" == *prewarm* ]] && sleep "${PREWARM_SLEEP:-0}"; echo "step.py ran" ;;
  bench/ops.py) [ -n "${SLOW_STEP:-}" ] && sleep "$SLOW_STEP"; echo "ops.py ran" ;;
esac
exit 0
"""

# a stand-in ncu: records its arguments; a profile (--export R) writes R.ncu-rep, an import prints a page
FAKE_NCU = """#!/usr/bin/env bash
echo "ncu $*" >> "$CALLS"
prev=""
for arg in "$@"; do
  [ "$prev" = "--export" ] && echo report > "$arg.ncu-rep"
  [ "$arg" = "--import" ] && echo "details page"
  prev=$arg
done
exit 0
"""


def run_script(
    tmp_path: Path, *args: str, env: dict | None = None, fake_python: str = FAKE_PYTHON
) -> tuple[subprocess.CompletedProcess, list[str]]:
    """gpu_check.sh copied into tmp_path/bench (it works in its parent folder) and run with the stand-in python."""
    (tmp_path / "bench").mkdir(exist_ok=True)
    shutil.copy(SCRIPT, tmp_path / "bench" / "gpu_check.sh")
    shutil.copy(NCU_SCRIPT, tmp_path / "bench" / "ncu_kernels.sh")
    fakes = {}
    for name, text in (("fakepy", fake_python), ("fakencu", FAKE_NCU)):
        fakes[name] = tmp_path / name
        fakes[name].write_text(text)
        fakes[name].chmod(fakes[name].stat().st_mode | stat.S_IEXEC)
    calls = tmp_path / "calls.txt"
    calls.write_text("")
    full_env = dict(os.environ, PYTHON=str(fakes["fakepy"]), NCU=str(fakes["fakencu"]), CALLS=str(calls), **(env or {}))
    proc = subprocess.run(
        ["bash", "bench/gpu_check.sh", *args], cwd=tmp_path, env=full_env, capture_output=True, text=True, timeout=120
    )
    commands = [line for line in calls.read_text().splitlines() if not line.startswith("-c")]
    return proc, commands


def test_default_order_and_summary(tmp_path):
    proc, commands = run_script(tmp_path, "--quick")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert commands == [
        "-m pip install -e . --no-build-isolation --no-deps",
        "-m pytest -q --durations=15 tests",
        "bench/ops.py --quick",
        "bench/profile_step.py",
        "bench/step.py --reps 3",
    ]
    for step in ("build", "backends", "tests", "ops", "profile", "step"):
        assert f"  {step}: exit 0" in proc.stdout


def test_prewarm_compiles_in_the_background_and_step_runs_first(tmp_path):
    proc, commands = run_script(
        tmp_path,
        "--gpu-tests-only",
        "--prewarm-compile",
        "--step-variants=reference,fused-triton,compiled",
        "--quick",
        "--ops-no-compile",
        "--ncu",
        env={"PREWARM_SLEEP": "2"},
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    background = "bench/step.py --variants compiled --reps 1 --no-sampling --out "
    prewarm = [c for c in commands if c.startswith(background)]
    assert len(prewarm) == 1
    # started first: it needs no build (the checkout is on its PYTHONPATH). The script's own log says so; the order
    # of the stand-in's records does not (a loaded machine may start the background process after the build's)
    assert proc.stdout.index("== prewarm-compile: in the background") < proc.stdout.index("== build: ")
    # the build and the tests run while the compile runs (it sleeps 2 s), then ncu, then the timed step before the
    # other benchmarks
    rest = [c for c in commands if not c.startswith(background)]
    profile, details, raw, summary = rest[2:6]
    assert profile.startswith("ncu --profile-from-start off --clock-control none --target-processes all")
    assert profile.endswith("fakepy bench/ncu_kernels.py")
    assert details.startswith("ncu --import ") and details.endswith(".ncu-rep --page details --print-units base")
    assert raw.startswith("ncu --import ") and raw.endswith(".ncu-rep --page raw --csv --print-units base")
    assert summary.startswith("bench/ncu_kernels.py --summarize ") and summary.endswith(".csv")
    assert rest == [
        "-m pip install -e . --no-build-isolation --no-deps",
        "-m pytest -q --durations=15 tests -m gpu -n 8",  # the stand-in answers that xdist imports
        profile,
        details,
        raw,
        summary,
        "bench/step.py --reps 3 --variants reference,fused-triton,compiled --no-sampling",
        "bench/ops.py --quick --no-compile",
        "bench/profile_step.py",
    ]
    reports = sorted((tmp_path / "bench" / "results").glob("ncu-fake-gpu-*"))  # the binary report is dropped
    assert [r.suffix for r in reports] == [".csv", ".txt"] and reports[1].read_text() == "details page\n"
    out = proc.stdout
    assert (
        out.index("== tests:") < out.index("== ncu:") < out.index("== prewarm-compile: waiting") < out.index("== step:")
    )
    assert "prewarm-compile: exit 0" in out
    assert "step.py ran" in out  # the background log's tail is shown
    logs = list((tmp_path / "bench" / "results").glob("prewarm-compile-fake-gpu-*.log"))
    assert len(logs) == 1


def test_launch_runs_after_the_profile(tmp_path):
    proc, commands = run_script(tmp_path, "--skip-tests", "--quick", "--launch")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert commands[-3:] == ["bench/profile_step.py", "bench/launch_overhead.py", "bench/step.py --reps 3"]
    assert "  launch: exit 0" in proc.stdout


def test_step_first_runs_the_step_before_ops_and_the_profile_of_the_variant_asked_for(tmp_path):
    proc, commands = run_script(
        tmp_path, "--gpu-tests-only", "--quick", "--step-first", "--step-variants=fused-triton,fused-triton-cl",
        "--profile-variant=fused-triton-cl", "--tune=group_norm",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert commands[1:5] == [
        "-m pytest -q --durations=15 tests -m gpu -n 8",  # (the stand-in answers that xdist imports)
        "bench/step.py --reps 3 --variants fused-triton,fused-triton-cl --no-sampling",
        "bench/ops.py --quick",
        "bench/profile_step.py --variant fused-triton-cl",
    ]
    assert commands[5].startswith("bench/tune_gpu.py") and len(commands) == 6  # the step ran once, first
    for step in ("build", "tests", "step", "ops", "profile", "tune"):
        assert f"  {step}: exit 0" in proc.stdout


def test_tune_runs_last_on_the_time_left(tmp_path):
    proc, commands = run_script(tmp_path, "--skip-tests", "--quick", "--tune=cuda_group_norm,group_norm")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert commands[-1].startswith("bench/tune_gpu.py --families cuda_group_norm group_norm --out bench/results/tune-")
    assert commands[-2] == "bench/step.py --reps 3" and "  tune: exit 0" in proc.stdout
    proc, commands = run_script(
        tmp_path, "--skip-tests", "--tune=group_norm", "--tune-gn-shapes=768x16,256x8", "--tune-passes=jvp,bwd"
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert commands[-1].startswith("bench/tune_gpu.py --families group_norm --out bench/results/tune-")
    assert commands[-1].endswith(".json --gn-shapes 768x16 256x8 --passes jvp bwd"), commands[-1]
    proc, commands = run_script(tmp_path, "--skip-tests", "--tune=group_norm", "--tune-dtype=float32")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert commands[-1].endswith(".json --dtype float32"), commands[-1]
    proc, commands = run_script(tmp_path, "--skip-tests", "--quick", "--tune=attention", "--deadline=500")
    # 30 s before the deadline, less the seconds the (stand-in) steps before it took
    assert 460 <= int(commands[-1].rsplit("--max-seconds ", 1)[1]) <= 470, commands[-1]
    proc, commands = run_script(tmp_path, "--skip-tests", "--tune=attention", "--deadline=40")
    assert "tune: skipped (deadline)" in proc.stdout and not any("tune_gpu" in c for c in commands)


def test_deadline_cuts_the_running_step_and_skips_the_rest(tmp_path):
    proc, commands = run_script(tmp_path, "--skip-tests", "--deadline=16", env={"SLOW_STEP": "60"})
    assert proc.returncode == 1  # the cut step counts as failed
    assert "ops: exit 124" in proc.stdout and "cut at the deadline" in proc.stdout
    assert "profile: skipped (deadline)" in proc.stdout and "step: skipped (deadline)" in proc.stdout
    assert "bench/profile_step.py" not in commands


@pytest.mark.parametrize(
    "args, message",
    [
        (["--bogus"], "unknown argument '--bogus'"),
        (["--deadline=soon"], "--deadline must be a positive number"),
        (["--step-variants=a b"], "--step-variants takes bench/step.py variant names"),
        (["--tune=cuda_gn"], "--tune takes bench/tune_gpu.py families"),
        (["--tune=group_norm,"], "--tune takes bench/tune_gpu.py families"),
        (["--tune-gn-shapes=768-16"], "--tune-gn-shapes takes GroupNorm shapes CxRES"),
        (["--tune-passes=jvp,back"], "--tune-passes takes fwd, jvp, bwd"),
        (["--tune-dtype=fp32"], "--tune-dtype takes bfloat16 or float32, got 'fp32'"),
        (["--profile-variant=fused triton"], "--profile-variant takes one bench/step.py variant name"),
        (["--step-first", "--prewarm-compile"], "--step-first and --prewarm-compile both choose when the step runs"),
    ],
)
def test_bad_arguments_are_named(tmp_path, args, message):
    proc, commands = run_script(tmp_path, *args)
    assert proc.returncode == 2
    assert message in proc.stderr
    assert commands == []


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help_prints_the_usage_and_runs_nothing(tmp_path, flag):
    proc, commands = run_script(tmp_path, flag)
    assert proc.returncode == 0 and commands == []
    assert proc.stdout.startswith("The one command for a GPU machine") and "--deadline=540" in proc.stdout
    assert not any(line.startswith("#") for line in proc.stdout.splitlines())


def test_copy_to_gets_the_log_and_one_archive_of_the_results(tmp_path):
    """A lease returns at most 8 files from $OUT: the run's result files travel as one tar, the log beside it."""
    import tarfile

    (tmp_path / "bench" / "results").mkdir(parents=True)
    old = tmp_path / "bench" / "results" / "old.json"  # written before the run: not this run's result
    old.write_text("{}")
    os.utime(old, (0, 0))
    fake_ops = FAKE_PYTHON.replace(
        'echo "ops.py ran"', 'echo "ops.py ran"; for i in $(seq 9); do echo $i > bench/results/row$i.json; done'
    )
    out = tmp_path / "out"
    proc, _ = run_script(tmp_path, "--skip-tests", f"--copy-to={out}", fake_python=fake_ops)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    logs = sorted(p.name for p in out.glob("gpu-check-fake-gpu-*.log"))
    assert len(logs) == 1 and sorted(p.name for p in out.iterdir()) == sorted([logs[0], "results.tar"])
    assert "== summary" in (out / logs[0]).read_text()
    with tarfile.open(out / "results.tar") as tar:
        names = sorted(Path(name).name for name in tar.getnames())
    assert names == [f"row{i}.json" for i in range(1, 10)]


def test_a_slow_prewarm_compile_is_stopped_before_the_deadline_and_the_step_runs_without_it(tmp_path):
    proc, commands = run_script(
        tmp_path,
        "--gpu-tests-only",
        "--prewarm-compile",
        "--step-variants=reference,compiled,fused-triton",
        "--quick",
        "--deadline=100",
        env={"PREWARM_SLEEP": "60", "PREWARM_RESERVE": "95"},
    )
    out = proc.stdout
    stopped = [line for line in out.splitlines() if "prewarm-compile: stopped after" in line]
    assert len(stopped) == 1 and stopped[0].endswith("before the deadline; the step runs without the compiled variant")
    assert proc.returncode == 1  # a stopped compile is not a success
    timed = [c for c in commands if c.startswith("bench/step.py --reps")]
    assert timed == ["bench/step.py --reps 3 --variants reference,fused-triton --no-sampling"]
    assert "bench/ops.py --quick" in commands and "bench/profile_step.py" in commands


def test_a_device_name_that_fails_stops_the_run_before_the_build(tmp_path):
    """bench/common.py imports imf: the device is named with this checkout on the path, before any install (an H100
    lease, 2026-11-27, named its log 'gpu-check--<time>.log' when that import failed); an empty name stops the run."""
    proc, commands = run_script(tmp_path, "--quick", fake_python=FAKE_PYTHON.replace("echo fake-gpu", "true"))
    assert proc.returncode == 1 and "could not name the device" in proc.stderr
    assert commands == []


def test_the_device_is_named_with_this_checkout_on_the_path(tmp_path):
    fake = FAKE_PYTHON.replace("echo fake-gpu", 'echo "$PYTHONPATH" > "$CALLS.path"; echo fake-gpu')
    proc, _ = run_script(tmp_path, "--quick", fake_python=fake)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    first = Path(str(tmp_path / "calls.txt") + ".path").read_text().strip().split(":")[0]
    assert Path(first).resolve() == tmp_path.resolve()


def test_diagnose_extension_errors_runs_the_probe_plain_and_under_cuda_gdb(tmp_path):
    """bench/diagnose_extension_errors.sh with stand-ins: the probe runs plain, with two settings of torch's C++
    backtraces, then under the debugger with a backtrace asked for, and the log holds every section."""
    script = Path(__file__).with_name("diagnose_extension_errors.sh")
    (tmp_path / "bench").mkdir()
    shutil.copy(script, tmp_path / "bench" / script.name)
    calls = tmp_path / "calls.txt"
    fakes = {
        "fakepy": 'echo "python $*" >> "$CALLS"; case "$2" in *m.__file__*) echo /x/_C.so ;; esac',
        "fakegdb": 'echo "gdb $*" >> "$CALLS"; echo "#0 0x0 in crash ()"; for i in $(seq 1 40); do '
        'echo "#$i 0x0 in f"; done; '
        "for lib in /lib/libm.so.6 /lib/libstdc++.so.6 /t/lib/libc10.so /n/cu13/lib/libcublas.so.13; do "
        'echo "0x00007ffff7ed9420  0x00007ffff7f573a6  Yes (*)     $lib"; done',
    }
    for name, body in fakes.items():
        (tmp_path / name).write_text(f"#!/usr/bin/env bash\n{body}\nexit 0\n")
        (tmp_path / name).chmod(0o755)
    env = dict(os.environ, PYTHON=str(tmp_path / "fakepy"), CUDA_GDB=str(tmp_path / "fakegdb"), CALLS=str(calls))
    proc = subprocess.run(
        ["bash", "bench/" + script.name, str(tmp_path / "out")], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    probe = "import tests.test_cuda_ops as t; exec(t.EXTENSION_ERRORS)"
    lines = calls.read_text().splitlines()
    assert lines.count(f"python -c {probe}") == 3
    gdb = [line for line in lines if line.startswith("gdb ")]
    assert len(gdb) == 1 and "-ex run -ex bt" in gdb[0] and gdb[0].endswith(f"fakepy -c {probe}")
    (log,) = (tmp_path / "out").glob("extension-errors-*.log")
    text = log.read_text()
    for section in (
        "== compiler and libraries",
        "== the probe, plain",
        "== the probe, TORCH_SHOW_CPP_STACKTRACES=1",
        "== the probe, TORCH_DISABLE_ADDR2LINE=1",
        "== the probe under cuda-gdb",
        "#0 0x0 in crash",
    ):
        assert section in text
    # the whole backtrace (a tail of the library list once cut its first frames), the libraries an exception's
    # path runs through, not the math and CUDA ones
    assert "#40 0x0 in f" in text and "libstdc++.so.6" in text and "libc10.so" in text
    assert "libm.so.6" not in text and "libcublas" not in text
