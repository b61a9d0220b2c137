// The emulated build of csrc/bindings.cpp (see cuda_emulation.h): tests/cuda_emulator.py compiles it
// with -DIMF_EMULATE.
#include "../bindings.cpp"
