// Which copy of the CPU kernels runs (csrc/cpu/dispatch.cpp), for pyamalgam.build_info().
#pragma once

namespace pyamalgam::cpu {

// "avx2" or "base": the instruction set of the registered CPU kernels.
const char* isa();

// The instruction sets compiled into this build, comma-separated ("base,avx2" on x86-64).
const char* compiled_isas();

}  // namespace pyamalgam::cpu
