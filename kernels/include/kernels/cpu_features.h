// Run-time instruction-set detection for the CPU backend.
#pragma once

#include <string_view>

namespace spear::kernels {

enum class Isa { kScalar = 0, kAvx2 = 1, kAvx512 = 2 };

// The best ISA this CPU supports (AVX2 needs AVX2+FMA+F16C; AVX-512 needs
// F/BW/VL/DQ).
Isa DetectIsa();
// The ISA the cpu:: kernels use now: DetectIsa() unless SetIsaForTesting
// lowered it or the environment variable SPEAR_CPU_ISA=scalar|avx2|avx512 did.
Isa ActiveIsa();
// Tests use this to run every variant available on this machine. Returns
// false (and changes nothing) when the CPU lacks `isa`.
bool SetIsaForTesting(Isa isa);
std::string_view IsaName(Isa isa);
// True when the active ISA is AVX-512 and the CPU has AVX512-BF16
// (VDPBF16PS), unless the environment variable SPEAR_CPU_BF16=0 turns the
// bf16 products of LinearParams::bf16_products off.
bool CpuHasBf16Dot();
// True when the active ISA is AVX-512 and the CPU has AVX512-FP16 (VFMADDPH),
// unless the environment variable SPEAR_CPU_F16=0 turns the fp16 products of
// LinearParams::f16_products off.
bool CpuHasF16Fma();

}  // namespace spear::kernels
