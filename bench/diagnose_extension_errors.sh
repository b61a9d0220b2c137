#!/usr/bin/env bash
# Why a check inside the CUDA extension kills the interpreter on the GPU machine (2026-11-27: SIGSEGV at the first
# TORCH_CHECK_VALUE that fails, torch 2.11 / the image's compiler; on the CPU machine's build the same calls raise
# ValueError): runs tests/test_cuda_ops.py's EXTENSION_ERRORS under cuda-gdb (which debugs host code too, where
# gdb is missing) and prints the C++ backtrace of the crash, with the compiler and the libraries involved.
#
#   bash bench/diagnose_extension_errors.sh [OUT_DIR]     # ~20 s once the extension is built; log OUT_DIR/...
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$(command -v python || command -v python3)}
out=${1:-bench/results}
mkdir -p "$out"
log="$out/extension-errors-$(date -u +%Y%m%dT%H%M%SZ).log"
probe='import tests.test_cuda_ops as t; exec(t.EXTENSION_ERRORS)'
{
    echo "== compiler and libraries"
    c++ --version | head -1
    "$PYTHON" -c "import torch; print('torch', torch.__version__, 'cxx11 abi', torch._C._GLIBCXX_USE_CXX11_ABI)"
    "$PYTHON" -c "import torch; print(torch.__config__.show())" 2>&1 | grep -E "GCC|CXX_COMPILER|CXX_FLAGS" | head -3
    so=$("$PYTHON" -c "import imf_kernels._C as m; print(m.__file__)" 2>&1)
    echo "extension $so"
    ldd "$so" 2>&1 | grep -E "stdc\+\+|gcc_s|c10|torch" | sed 's/^/  /'
    echo "== the probe, plain"
    PYTHONPATH=$PWD "$PYTHON" -c "$probe"
    echo "exit $?"
    # c10::Error records a backtrace when thrown and symbolises it when its message is read: if the crash is in the
    # symbolising, these change it (C++ frames in the message; no addr2line)
    echo "== the probe, TORCH_SHOW_CPP_STACKTRACES=1"
    TORCH_SHOW_CPP_STACKTRACES=1 PYTHONPATH=$PWD "$PYTHON" -c "$probe"
    echo "exit $?"
    echo "== the probe, TORCH_DISABLE_ADDR2LINE=1"
    TORCH_DISABLE_ADDR2LINE=1 PYTHONPATH=$PWD "$PYTHON" -c "$probe"
    echo "exit $?"
    echo "== the probe under cuda-gdb"
    gdb=${CUDA_GDB:-$(command -v cuda-gdb || echo /usr/local/cuda/bin/cuda-gdb)}
    # the whole backtrace (the seventh lease's log kept only its last 13 frames: a tail of the library list cut
    # the crashing ones), the faulting instruction, then only the libraries an exception's path runs through
    PYTHONPATH=$PWD timeout 120 "$gdb" -q -batch -ex "set pagination off" -ex run -ex "bt 60" -ex "x/3i \$pc" \
        -ex "info sharedlibrary" --args "$PYTHON" -c "$probe" 2>&1 | grep -vE "^\[(New|Thread|Detaching)" |
        grep -vE "^0x[0-9a-f]+ +0x[0-9a-f]+ .*/(lib(m|z|expat|bz2|lzma|ffi|crypto|ssl|cu[a-z]+|nv[a-zA-Z]+|nccl|"\
"cublas[A-Za-z]*|cudnn[a-z_]*)\.so|python3\.12/lib-dynload|numpy)" | head -150
} 2>&1 | tee "$log"
echo "log: $log"
