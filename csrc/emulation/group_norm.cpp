// The emulated build of csrc/group_norm.cu (see cuda_emulation.h): tests/cuda_emulator.py compiles it
// with -DIMF_EMULATE.
#include "../group_norm.cu"
