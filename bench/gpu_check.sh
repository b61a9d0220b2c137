#!/usr/bin/env bash
# The one command for a GPU machine (DESIGN 7): build the CUDA extension for this GPU, run the whole test suite
# (gpu tests included), run the kernel and training-step benchmarks, and keep a log and the results.
#
#   bash bench/gpu_check.sh                # everything
#   bash bench/gpu_check.sh --skip-tests   # build + benchmarks only (when device time is short)
#   bash bench/gpu_check.sh --quick        # build + tests + bench/ops.py on the latent-b shapes (and two big losses),
#                                          # bench/profile_step.py, bench/step.py with 3 repetitions
#   bash bench/gpu_check.sh --gpu-tests-only --quick   # a short lease: only the `gpu`-marked tests (CI runs the
#                                                      # rest on CPU) and the quick benchmarks
#   bash bench/gpu_check.sh --gpu-tests-only --quick --deadline=540 --copy-to="$OUT"
#       # a lease call: every step is cut at 540 s after the start (the steps after it are skipped, named in the
#       # summary), and after each step the log and an archive of the result files, results.tar, are copied to $OUT
#       # (a cut call keeps them; two files, where a lease returns at most 8)
#   bash bench/gpu_check.sh --gpu-tests-only --prewarm-compile --step-variants=reference,fused-triton,compiled \
#       --quick --deadline=560 --copy-to="$OUT"
#       # a lease call for the compiled baseline: Inductor compiles the latent-b step (minutes) in a background
#       # process from the start, during the build and the tests; bench/step.py then runs first among the
#       # benchmarks and finds the compiled graphs in Inductor's on-disk caches (on a CPU a cached compile took 62 s
#       # against 436 s cold)
#   --ops-no-compile: bench/ops.py without its torch.compile column (a lease's time goes to the kernels' rows)
#   --ncu: after the tests, bench/ncu_kernels.sh: Nsight Compute's occupancy, throughput and stall reasons for one
#          launch of each GroupNorm / loss case (~1 min; while a --prewarm-compile runs, before the timed steps)
#   --tune=FAMILIES: last, bench/tune_gpu.py --families FAMILIES (comma-separated: group_norm, attention,
#          cuda_group_norm) on the time left (with --deadline: stops starting configurations 30 s before it, and is
#          skipped with under 45 s left), rows to bench/results/tune-<device>-<time>.json
#   --tune-gn-shapes=768x16,256x8 / --tune-passes=jvp,bwd: only those GroupNorm shapes (CxRES) / passes in the sweep
#   --tune-dtype=float32: the sweep's inputs in float32 (default bfloat16): the training step's graded pass and its
#          backward run in float32 also with --bf16 targets, and no GPU had timed float32 launch rules
#   --launch: after the profile, bench/launch_overhead.py: the host's time per call of each op, layer by layer
#          (public op, launcher, Triton's JIT launch, a compiled kernel's launch; ~30 s, most of it compiling)
#   --step-first: bench/step.py right after the tests, before bench/ops.py and the profile (a lease whose deadline
#          may not reach all of them keeps the training-step rows)
#   --profile-variant=NAME: the bench/step.py variant bench/profile_step.py profiles (default: its own, the fused
#          step on triton), e.g. fused-triton-cl
#
# Installs nothing but this project (pip --no-deps --no-build-isolation): the machine needs torch, triton,
# nvcc (CUDA_HOME, default /usr/local/cuda) and the test tools already. Every step runs even when an earlier
# one fails; the summary at the end lists each step's exit status, and the script exits non-zero if any failed.
# Results: bench/results/<device>.json (bench/ops.py appends), bench/step.py's files, and the log
# bench/results/gpu-check-<device>-<UTC time>.log; the summary lists the files this run wrote.

set -uo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-$(command -v python || command -v python3)}
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
skip_tests=0
test_args=()
ops_args=()
step_args=()
gpu_tests_only=0
deadline=""
copy_to=""
prewarm=0
step_variants=""
ncu=0
tune=""
tune_gn_shapes=""
tune_passes=""
tune_dtype=""
launch=0
step_first=0
profile_variant=""
for arg in "$@"; do
    case "$arg" in
        -h|--help) sed -n '2,/^[^#]/{/^#/s/^# \{0,1\}//p}' "$0"; exit 0 ;;  # the comment block above is the usage
        --skip-tests) skip_tests=1 ;;
        --quick) ops_args+=(--quick); step_args+=(--reps 3) ;;
        --gpu-tests-only) test_args+=(-m gpu); gpu_tests_only=1 ;;
        --deadline=*) deadline=${arg#--deadline=} ;;
        --copy-to=*) copy_to=${arg#--copy-to=} ;;
        --prewarm-compile) prewarm=1 ;;
        --step-variants=*) step_variants=${arg#--step-variants=} ;;
        --ops-no-compile) ops_args+=(--no-compile) ;;
        --ncu) ncu=1 ;;
        --tune=*) tune=${arg#--tune=} ;;
        --tune-gn-shapes=*) tune_gn_shapes=${arg#--tune-gn-shapes=} ;;
        --tune-passes=*) tune_passes=${arg#--tune-passes=} ;;
        --tune-dtype=*) tune_dtype=${arg#--tune-dtype=} ;;
        --launch) launch=1 ;;
        --step-first) step_first=1 ;;
        --profile-variant=*) profile_variant=${arg#--profile-variant=} ;;
        *) echo "gpu_check.sh: unknown argument '$arg' (accepted: --skip-tests, --quick, --gpu-tests-only," \
               "--deadline=SECONDS, --copy-to=DIR, --prewarm-compile, --step-variants=LIST, --ops-no-compile, --ncu," \
               "--tune=FAMILIES, --tune-gn-shapes=CxRES,..., --tune-passes=PASSES, --tune-dtype=DTYPE, --launch," \
               "--step-first, --profile-variant=NAME)" >&2
           exit 2 ;;
    esac
done
if [ -n "$deadline" ] && ! [[ "$deadline" =~ ^[0-9]+$ && "$deadline" -gt 0 ]]; then
    echo "gpu_check.sh: --deadline must be a positive number of seconds, got '$deadline'" >&2
    exit 2
fi
if [ -n "$step_variants" ]; then
    if ! [[ "$step_variants" =~ ^[a-z0-9,-]+$ ]]; then
        echo "gpu_check.sh: --step-variants takes bench/step.py variant names separated by commas, got" \
             "'$step_variants'" >&2
        exit 2
    fi
    step_args+=(--variants "$step_variants" --no-sampling)
fi
tune_families="group_norm|attention|cuda_group_norm"  # bench/tune_gpu.py --families choices
if [ -n "$tune" ] && ! [[ "$tune" =~ ^($tune_families)(,($tune_families))*$ ]]; then
    echo "gpu_check.sh: --tune takes bench/tune_gpu.py families (${tune_families//|/, }) separated" \
         "by commas, got '$tune'" >&2
    exit 2
fi
if [ -n "$tune_gn_shapes" ] && ! [[ "$tune_gn_shapes" =~ ^[0-9]+[xX][0-9]+(,[0-9]+[xX][0-9]+)*$ ]]; then
    echo "gpu_check.sh: --tune-gn-shapes takes GroupNorm shapes CxRES separated by commas (e.g. 768x16,256x8)," \
         "got '$tune_gn_shapes'" >&2
    exit 2
fi
if [ -n "$tune_dtype" ] && ! [[ "$tune_dtype" =~ ^(bfloat16|float32)$ ]]; then
    echo "gpu_check.sh: --tune-dtype takes bfloat16 or float32, got '$tune_dtype'" >&2
    exit 2
fi
if [ -n "$tune_passes" ] && ! [[ "$tune_passes" =~ ^(fwd|jvp|bwd)(,(fwd|jvp|bwd))*$ ]]; then
    echo "gpu_check.sh: --tune-passes takes fwd, jvp, bwd separated by commas, got '$tune_passes'" >&2
    exit 2
fi
if [ -n "$profile_variant" ] && ! [[ "$profile_variant" =~ ^[a-z0-9-]+$ ]]; then
    echo "gpu_check.sh: --profile-variant takes one bench/step.py variant name, got '$profile_variant'" >&2
    exit 2
fi
if [ "$step_first" = 1 ] && [ "$prewarm" = 1 ]; then
    echo "gpu_check.sh: --step-first and --prewarm-compile both choose when the step runs; pass one" >&2
    exit 2
fi
if [ -n "$copy_to" ] && ! mkdir -p "$copy_to"; then
    echo "gpu_check.sh: --copy-to: cannot create the folder '$copy_to'" >&2
    exit 2
fi

if ! "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check.sh: torch sees no CUDA device; this command is for a GPU machine" >&2
    exit 1
fi
# e.g. "9.0" on an H100/H200: the extension is built for this card only (fast, and what the tests load)
arch=$("$PYTHON" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
# (before the build: this checkout's packages on the path, for bench/common.py imports imf)
slug=$(cd bench && PYTHONPATH="$PWD/..${PYTHONPATH:+:$PYTHONPATH}" \
    "$PYTHON" -c "import torch, common; print(common.device_slug(torch.device('cuda')))")
if [ -z "$slug" ]; then
    echo "gpu_check.sh: bench/common.py could not name the device (its error is above)" >&2
    exit 1
fi
mkdir -p bench/results
started_stamp=$(mktemp)  # files under bench/results newer than this are what this run wrote
log="bench/results/gpu-check-${slug}-$(date -u +%Y%m%dT%H%M%SZ).log"
exec > >(tee -a "$log") 2>&1

echo "== gpu_check: $(date -u) on $(hostname)"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
echo "commit $(git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)"
"$PYTHON" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
echo "TORCH_CUDA_ARCH_LIST=$arch CUDA_HOME=$CUDA_HOME"

statuses=()
copy_results() {
    # what this run wrote under bench/results, as one archive in --copy-to (a lease returns at most 8 files; a run
    # writes more), and the log beside it as a plain file; the archive is replaced whole, so a cut run keeps the last
    [ -z "$copy_to" ] && return 0
    (find bench/results -type f -newer "$started_stamp" ! -path "$log" -print0 |
        tar -cf "$copy_to/results.tar.tmp" --null -T - && mv -f "$copy_to/results.tar.tmp" "$copy_to/results.tar")
    cp -f "$log" "$copy_to"/ 2>/dev/null
    return 0
}
run_step() {
    local name=$1
    shift
    echo
    local limit=()
    if [ -n "$deadline" ]; then
        local left=$((deadline - SECONDS))
        if [ "$left" -lt 15 ]; then
            echo "== $name: skipped, $left s left before the ${deadline} s deadline"
            statuses+=("$name: skipped (deadline)")
            return 0
        fi
        limit=(timeout -k 10 "$left")
    fi
    echo "== $name: $*"
    local started=$SECONDS
    ${limit[@]+"${limit[@]}"} "$@"
    local status=$?
    local note=""
    [ -n "$deadline" ] && [ "$status" = 124 ] && note=", cut at the deadline"
    statuses+=("$name: exit $status ($((SECONDS - started)) s$note)")
    copy_results
    return 0
}

prewarm_pid=""
if [ "$prewarm" = 1 ]; then
    # The compiled reference step compiled once in the background, from the start (its timings are thrown away: it
    # shares the GPU and the CPU cores with the build and the tests); the timed bench/step.py run below compiles
    # again from Inductor's caches. It runs the plain PyTorch reference, so it needs no CUDA extension and reads
    # the packages from this checkout (PYTHONPATH) while pip installs them.
    prewarm_log="bench/results/prewarm-compile-${slug}-$(date -u +%Y%m%dT%H%M%SZ).log"
    prewarm_limit=()
    [ -n "$deadline" ] && prewarm_limit=(timeout -k 10 "$((deadline - SECONDS))")
    echo
    echo "== prewarm-compile: in the background, log $prewarm_log"
    PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" ${prewarm_limit[@]+"${prewarm_limit[@]}"} \
        "$PYTHON" bench/step.py --variants compiled --reps 1 --no-sampling \
        --out "$(mktemp --suffix=-prewarm-step.json)" >"$prewarm_log" 2>&1 &
    prewarm_pid=$!
    prewarm_started=$SECONDS
fi
# The CUDA 13 torch wheels ship the CUDA headers the extension needs in nvidia/cu13/include (as the Makefile).
cu13_include=$("$PYTHON" -c "import importlib.util as u, os; s = u.find_spec('nvidia'); \
p = os.path.join(list(s.submodule_search_locations)[0], 'cu13', 'include') if s else ''; \
print(p if p and os.path.isdir(p) else '')")
export CPATH="${cu13_include:+$cu13_include:}${CPATH:-}"
run_step build env TORCH_CUDA_ARCH_LIST="$arch" "$PYTHON" -m pip install -e . --no-build-isolation --no-deps
# every backend (cuda, triton, torch) must be usable on a GPU machine; a failed build shows here by name
run_step backends "$PYTHON" -c $'import sys, imf_kernels\nstatuses = imf_kernels.backends()\nfor status in statuses:\n    print(" ", status)\nsys.exit(0 if all(s.usable for s in statuses) else 1)'
if [ "$skip_tests" = 0 ]; then
    # 8 pytest-xdist workers where the plugin is there (the GPU image has it): the gpu tests took 95 s on an H200
    # that way (2026-11-26), against 137-200 s in one process, most of it Triton compiling on the CPU cores
    # (the gpu tests only: they ran that way on the H200; the CPU tests were never checked for parallel runs)
    if [ "$gpu_tests_only" = 1 ] && "$PYTHON" -c "import xdist" 2>/dev/null; then
        test_args+=(-n 8)
    fi
    # (--durations: the slowest tests in the log, for trimming a lease's 2-minute test step)
    run_step tests "$PYTHON" -m pytest -q --durations=15 tests ${test_args[@]+"${test_args[@]}"}
fi
if [ "$ncu" = 1 ]; then
    run_step ncu env PYTHON="$PYTHON" bash bench/ncu_kernels.sh bench/results
fi
if [ -n "$prewarm_pid" ]; then
    # nothing timed shares the GPU with the compile; the step benchmark, which needs its caches, runs first
    echo
    echo "== prewarm-compile: waiting for it (started $((SECONDS - prewarm_started)) s ago)"
    # With a deadline the wait ends PREWARM_RESERVE s (default 240) before it: a compile still running then is
    # stopped, and the timed step runs without the compiled variant, so a slow compile cannot take the step,
    # ops and profile rows with it (lease d: the compiled step was cut at 244 s, cold).
    cut_prewarm=0
    if [ -n "$deadline" ]; then
        wait_until=$((deadline - ${PREWARM_RESERVE:-240}))
        while kill -0 "$prewarm_pid" 2>/dev/null && [ "$SECONDS" -lt "$wait_until" ]; do
            sleep 1
        done
        if kill -0 "$prewarm_pid" 2>/dev/null; then
            cut_prewarm=1
            kill "$prewarm_pid" 2>/dev/null
        fi
    fi
    wait "$prewarm_pid"
    prewarm_status=$?
    if [ "$cut_prewarm" = 1 ]; then
        note="${PREWARM_RESERVE:-240} s before the deadline; the step runs without the compiled variant"
        statuses+=("prewarm-compile: stopped after $((SECONDS - prewarm_started)) s, $note")
        kept=$(tr ',' '\n' <<<"$step_variants" | grep -vx compiled | paste -sd, -)
        for i in "${!step_args[@]}"; do
            [ "${step_args[$i]}" = "$step_variants" ] && step_args[$i]=$kept
        done
    else
        statuses+=("prewarm-compile: exit $prewarm_status ($((SECONDS - prewarm_started)) s in the background)")
    fi
    tail -5 "$prewarm_log"
    copy_results
    run_step step "$PYTHON" bench/step.py ${step_args[@]+"${step_args[@]}"}
fi
if [ "$step_first" = 1 ]; then
    run_step step "$PYTHON" bench/step.py ${step_args[@]+"${step_args[@]}"}
fi
run_step ops "$PYTHON" bench/ops.py ${ops_args[@]+"${ops_args[@]}"}
# where the fused step's time goes (kernels by kind; whether the host keeps ahead): one profiled step, ~30 s
run_step profile "$PYTHON" bench/profile_step.py ${profile_variant:+--variant "$profile_variant"}
if [ "$launch" = 1 ]; then
    run_step launch "$PYTHON" bench/launch_overhead.py
fi
if [ -z "$prewarm_pid" ] && [ "$step_first" != 1 ]; then
    run_step step "$PYTHON" bench/step.py ${step_args[@]+"${step_args[@]}"}
fi
if [ -n "$tune" ]; then
    tune_args=(--families ${tune//,/ } --out "bench/results/tune-${slug}-$(date -u +%Y%m%dT%H%M%SZ).json")
    [ -n "$tune_gn_shapes" ] && tune_args+=(--gn-shapes ${tune_gn_shapes//,/ })
    [ -n "$tune_passes" ] && tune_args+=(--passes ${tune_passes//,/ })
    [ -n "$tune_dtype" ] && tune_args+=(--dtype "$tune_dtype")
    tune_left=$(( ${deadline:-0} - SECONDS ))
    if [ -n "$deadline" ] && [ "$tune_left" -lt 45 ]; then
        echo
        echo "== tune: skipped, $tune_left s left before the ${deadline} s deadline"
        statuses+=("tune: skipped (deadline)")
    else
        # the sweep writes its rows at the end: it stops starting configurations 30 s before the deadline
        [ -n "$deadline" ] && tune_args+=(--max-seconds "$((tune_left - 30))")
        run_step tune "$PYTHON" bench/tune_gpu.py "${tune_args[@]}"
    fi
fi

echo
echo "== summary"
failed=0
for status in "${statuses[@]}"; do
    echo "  $status"
    case "$status" in *": exit 0 "*) ;; *) failed=1 ;; esac
done
echo "results written by this run:"
find bench/results -type f -newer "$started_stamp" | sed 's/^/  /'
echo "log: $log"
copy_results
rm -f "$started_stamp"
exit $failed
