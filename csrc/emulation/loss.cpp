// The emulated build of csrc/loss.cu (see cuda_emulation.h): tests/cuda_emulator.py compiles it
// with -DIMF_EMULATE.
#include "../loss.cu"
