#!/usr/bin/env bash
# Nsight Compute report of one launch of each kernel case of bench/ncu_kernels.py (GroupNorm passes, the loss, a
# copy as the yardstick), on a GPU machine with ncu (the lent machines' image has it):
#
#   bash bench/ncu_kernels.sh [DIR]      # DIR default bench/results; writes ncu-<device>-<UTC time>.txt there
#
# --clock-control none: the card's clocks are left as they are (ncu would otherwise lock them to base for the
# profile); the numbers are shares of peak and stall reasons, not times to quote.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-bench/results}
mkdir -p "$out" || exit 2
PYTHON=${PYTHON:-$(command -v python || command -v python3)}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # this checkout's packages, installed or not
NCU=${NCU:-$(command -v ncu || ls -d /opt/nvidia/nsight-compute/*/ncu /usr/local/cuda/bin/ncu 2>/dev/null | tail -1)}
if [ -z "$NCU" ] || ! [ -x "$NCU" ]; then
    echo "ncu_kernels.sh: no ncu found (set NCU=/path/to/ncu)" >&2
    exit 1
fi
slug=$(cd bench && "$PYTHON" -c "import torch, common; print(common.device_slug(torch.device('cuda')))") || exit 1
report="$out/ncu-${slug}-$(date -u +%Y%m%dT%H%M%SZ)"
"$NCU" --profile-from-start off --clock-control none --target-processes all \
    --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats \
    --section SchedulerStats --section MemoryWorkloadAnalysis \
    --export "$report" --force-overwrite "$PYTHON" bench/ncu_kernels.py
status=$?
# the details page as text (every section's metrics per kernel, in launch order) and the raw page as CSV (every
# metric, for `bench/ncu_kernels.py --summarize`); then the binary report is dropped: it needs ncu to read, and a
# lease brings back few files
if [ -f "$report.ncu-rep" ]; then
    "$NCU" --import "$report.ncu-rep" --page details --print-units base > "$report.txt"
    "$NCU" --import "$report.ncu-rep" --page raw --csv --print-units base > "$report.csv"
    rm -f "$report.ncu-rep"
    echo "ncu_kernels.sh: $report.txt $report.csv"
    "$PYTHON" bench/ncu_kernels.py --summarize "$report.csv" || status=1
fi
exit $status
