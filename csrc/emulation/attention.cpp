// The emulated build of csrc/attention.cu (see cuda_emulation.h): tests/cuda_emulator.py compiles it
// with -DIMF_EMULATE.
#include "../attention.cu"
