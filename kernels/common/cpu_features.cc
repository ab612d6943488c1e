#include "kernels/cpu_features.h"

#include <cpuid.h>

#include <atomic>
#include <cstdlib>
#include <cstring>

namespace spear::kernels {
namespace {

// The environment variable `name` is set to "0" (a feature switched off).
bool EnvIsZero(const char* name) {
  const char* v = std::getenv(name);
  return v != nullptr && std::strcmp(v, "0") == 0;
}

// CPUID leaf / subleaf register bit (the feature bits
// __builtin_cpu_supports reads; clang 14 knows neither "f16c" nor
// "avx512fp16" by name). The OS's saving of the YMM / ZMM state is checked
// by the builtins for avx2 / avx512f, which every caller requires too.
bool CpuidBit(unsigned leaf, unsigned subleaf, int reg, int bit) {
  unsigned r[4] = {0, 0, 0, 0};  // eax, ebx, ecx, edx
  if (__get_cpuid_count(leaf, subleaf, &r[0], &r[1], &r[2], &r[3]) == 0) return false;
  return ((r[reg] >> bit) & 1u) != 0;
}
constexpr int kEcx = 2, kEdx = 3;

// -1 = not yet resolved; otherwise an Isa value. Resolved lazily so that the
// environment variable is read after main() starts.
std::atomic<int> g_active_isa{-1};

Isa IsaFromEnv(Isa detected) {
  const char* env = std::getenv("SPEAR_CPU_ISA");
  if (env == nullptr || *env == '\0') return detected;
  Isa wanted = detected;
  if (std::strcmp(env, "scalar") == 0) {
    wanted = Isa::kScalar;
  } else if (std::strcmp(env, "avx2") == 0) {
    wanted = Isa::kAvx2;
  } else if (std::strcmp(env, "avx512") == 0) {
    wanted = Isa::kAvx512;
  }
  // The override can only lower the ISA: running instructions the CPU lacks
  // would crash with SIGILL.
  return static_cast<int>(wanted) < static_cast<int>(detected) ? wanted : detected;
}

}  // namespace

Isa DetectIsa() {
  __builtin_cpu_init();
  // __builtin_cpu_supports also checks that the OS saves the YMM/ZMM state.
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                    CpuidBit(1, 0, kEcx, 29);  // F16C
  const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") &&
                      __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
                      __builtin_cpu_supports("avx512dq");
  if (avx512) return Isa::kAvx512;
  if (avx2) return Isa::kAvx2;
  return Isa::kScalar;
}

Isa ActiveIsa() {
  int v = g_active_isa.load(std::memory_order_acquire);
  if (v < 0) {
    v = static_cast<int>(IsaFromEnv(DetectIsa()));
    int expected = -1;
    // A concurrent SetIsaForTesting wins over the lazy default.
    if (!g_active_isa.compare_exchange_strong(expected, v, std::memory_order_acq_rel)) {
      v = expected;
    }
  }
  return static_cast<Isa>(v);
}

bool SetIsaForTesting(Isa isa) {
  if (static_cast<int>(isa) > static_cast<int>(DetectIsa())) return false;
  g_active_isa.store(static_cast<int>(isa), std::memory_order_release);
  return true;
}

bool CpuHasBf16Dot() {
  static const bool has = (__builtin_cpu_init(), __builtin_cpu_supports("avx512bf16") != 0 &&
                                                     !EnvIsZero("SPEAR_CPU_BF16"));
  return has && ActiveIsa() == Isa::kAvx512;
}

bool CpuHasF16Fma() {
  // AVX512-FP16: CPUID.(7, 0):EDX bit 23.
  static const bool has = CpuidBit(7, 0, kEdx, 23) && !EnvIsZero("SPEAR_CPU_F16");
  return has && ActiveIsa() == Isa::kAvx512;
}

std::string_view IsaName(Isa isa) {
  switch (isa) {
    case Isa::kScalar:
      return "scalar";
    case Isa::kAvx2:
      return "avx2";
    case Isa::kAvx512:
      return "avx512";
  }
  return "unknown";
}

}  // namespace spear::kernels
