"""bench/ncu_kernels.py's cases run (on the CPU, Triton's interpreter, fp32, batch 1): what a lease's ncu call
profiles is known to work before the lease."""

from __future__ import annotations

import ncu_kernels
import pytest
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


# ncu's raw page as CSV: a header naming every metric, a units row, one row per kernel (a "==PROF==" line may come
# first); values may carry thousands separators
STALLED = "smsp__average_warp_latency_issue_stalled_"
RAW_COLUMNS = {
    "ID": ("", "0", "1"),
    "Process ID": ("", "4242", "4242"),
    "Kernel Name": ("", "_gn_fwd_kernel", "reduce_kernel"),
    "gpu__time_duration.sum": ("nsecond", "61,234", "2,000"),
    "dram__throughput.avg.pct_of_peak_sustained_elapsed": ("%", "71.5", "n/a"),
    "sm__warps_active.avg.pct_of_peak_sustained_active": ("%", "38.2", "10"),
    "sm__maximum_warps_per_active_cycle_pct": ("%", "37.5", "50"),
    "launch__registers_per_thread": ("register/thread", "128", "32"),
    "launch__block_size": ("", "128", "512"),
    "launch__grid_size": ("", "8,192", "256"),
    STALLED + "long_scoreboard.ratio": ("", "12.5", ""),
    STALLED + "barrier.ratio": ("", "3.25", ""),
    STALLED + "wait.ratio": ("", "1.5", ""),
    STALLED + "not_selected.ratio": ("", "9.0", ""),
    STALLED + "math_pipe_throttle.ratio": ("", "0.5", ""),
}


def raw_csv() -> str:
    rows = [list(RAW_COLUMNS), *zip(*RAW_COLUMNS.values(), strict=True)]
    return "==PROF== Disconnected from process 4242\n" + "".join(
        ",".join(f'"{cell}"' for cell in row) + "\n" for row in rows
    )


def test_a_raw_csv_export_is_summarised(tmp_path):
    path = tmp_path / "ncu.csv"
    path.write_text(raw_csv())
    gn, reduce = ncu_kernels.summarize_ncu_csv(path)
    assert gn["kernel"] == "_gn_fwd_kernel"
    assert gn["us"] == pytest.approx(61.234)
    assert (gn["DRAM % peak"], gn["occupancy %"], gn["theoretical %"]) == (71.5, 38.2, 37.5)
    assert (gn["regs"], gn["block"], gn["grid"]) == (128, 128, 8192)
    assert gn["top stalls"] == "long_scoreboard 12.5, not_selected 9.0, barrier 3.2"
    assert reduce["DRAM % peak"] is None and reduce["top stalls"] == ""  # absent values stay absent
    ncu_kernels.print_summary([gn, reduce])


def test_a_file_that_is_no_ncu_export_is_named(tmp_path):
    path = tmp_path / "other.csv"
    path.write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="other.csv: no ncu raw CSV table"):
        ncu_kernels.summarize_ncu_csv(path)


@pytest.mark.parametrize("name, message", [("absent.csv", "no file"), ("other.csv", "no ncu raw CSV table")])
def test_summarize_refuses_a_missing_or_foreign_file_by_name(tmp_path, capsys, name, message):
    (tmp_path / "other.csv").write_text("a,b\n1,2\n")
    with pytest.raises(SystemExit) as exit_info:
        ncu_kernels.main(["--summarize", str(tmp_path / name)])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
