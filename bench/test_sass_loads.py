"""bench/sass_loads.py: its reading of a SASS listing, and what it reads in the kernels changed on 2026-11-27 (their
loads no longer wait for one another in the sm_90 code the installed Triton generates)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import sass_loads

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
from triton_builds import BUILDS, compiling_env  # noqa: E402


def listing(*lines: str) -> str:
    return "\n".join(f"        /*{16 * i:04x}*/                   {line} ;  /* 0x0 */" for i, line in enumerate(lines))


def test_a_load_after_an_earlier_loads_data_was_read_waited():
    schedule = sass_loads.load_schedule(
        listing(
            "@P5 LDG.E.128 R4, desc[UR14][R28.64]",
            "FADD R29, R4, R5",  # x's data read ...
            "@P5 LDG.E.128 R8, desc[UR14][R30.64]",  # ... before dx is loaded: waited
            "FADD R30, R8, R29",
        )
    )
    assert (schedule.loads, schedule.vector_loads, schedule.waited_vector_loads) == (2, 2, 1)
    assert schedule.waited == ["LDG.E.128 R8, desc[UR14][R30.64]"]


def test_loads_issued_together_and_async_copies_did_not_wait():
    schedule = sass_loads.load_schedule(
        listing(
            "@P0 LDG.E.128 R8, desc[UR6][R12.64]",
            "@P0 LDG.E.128 R4, desc[UR6][R14.64]",
            "FADD R17, R8, R4",
            "LDGSTS.E.BYPASS.128 [R3], desc[UR16][R4.64], P2",  # an async copy reads R4 as an address, not a load
            "LDGDEPBAR",
            "STG.E.128 desc[UR16][R22.64], R8",
        )
    )
    assert (schedule.loads, schedule.async_copies, schedule.waited, schedule.after_barrier) == (2, 1, [], [])


def test_a_load_after_a_barrier_is_listed_apart():
    schedule = sass_loads.load_schedule(
        listing("LDG.E R32, desc[UR6][R2.64]", "BAR.SYNC.DEFER_BLOCKING 0x0", "LDG.E R33, desc[UR6][R4.64]")
    )
    assert schedule.waited == [] and schedule.after_barrier == ["LDG.E R33, desc[UR6][R4.64]"]


def test_an_overwritten_register_is_no_longer_a_loads_data():
    schedule = sass_loads.load_schedule(
        listing("LDG.E R4, desc[UR6][R2.64]", "MOV R4, RZ", "FADD R5, R4, R4", "LDG.E R6, desc[UR6][R8.64]")
    )
    assert schedule.waited == []


def schedules(build: str, *names: str) -> dict[str, dict]:
    """{spec name: its load schedule} from bench/sass_loads.py --json in a child process (a real compile, not the
    interpreter) with the Triton of `build` (tests/triton_builds.py: the installed one or the GPU image's)."""
    env, version = compiling_env(build)
    done = subprocess.run(
        [sys.executable, str(REPO / "bench" / "sass_loads.py"), "--json", *names],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    rows = {row["name"]: row for row in map(json.loads, done.stdout.splitlines())}
    assert version is None or {row["triton"] for row in rows.values()} == {version}
    return rows


PIPELINED = {f"gn_{p}_bf16_c32_s3_hw128_chunked_silu": f"gn_{p}_bf16_c32_hw128_chunked_silu" for p in ("jvp", "bwd")}
AT_ONCE = ("gn_param_sums_bf16_c16_b256_c8_one", "imf_loss_finish_b256_c4")


@pytest.mark.parametrize("build", BUILDS)
def test_the_kernels_changed_on_2026_11_27_issue_their_loads_together(build):
    rows = schedules(build, *PIPELINED, *PIPELINED.values(), *AT_ONCE)
    # C768 16x16 (the worst forward-with-tangent of the sixth lease), forward-with-tangent and backward: the
    # 3-stage variant copies asynchronously and no 16-byte load waits; the plain loops (the launcher's pick again
    # since the seventh lease timed both) read each chunk's x before loading its dx
    for pipelined, plain in PIPELINED.items():
        assert rows[pipelined]["async_copies"] >= 8 and rows[pipelined]["vector_loads"] == 0, pipelined
        assert not [load for load in rows[pipelined]["waited"] if ".128" in load], pipelined
        assert rows[plain]["async_copies"] == 0 and len([w for w in rows[plain]["waited"] if ".128" in w]) >= 1
    # the batch sums (batch <= 256) and the loss finish: every load before anything reads one, or a barrier
    for name in AT_ONCE:
        assert rows[name]["loads"] >= 2 and rows[name]["waited"] == [] and rows[name]["after_barrier"] == [], name
