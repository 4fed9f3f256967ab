// Run-time choice between the instruction-set variants of the CPU kernels (csrc/cpu/kernels.h).
//
// The choice is one process-wide atomic, made on first use: UMM_CPU_ISA from the environment when set (an
// unknown or unsupported name is an error at that first call, naming the options), else the widest variant
// this CPU supports.  set_cpu_isa changes it at any time (tests run every variant in one process).
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <atomic>
#include <cstdlib>
#include <string>
#include <vector>

#include "cpu/kernels.h"

#ifndef UMM_CPU_BASE_NAME
#define UMM_CPU_BASE_NAME "generic"
#endif

namespace umm::cpu {
namespace {

enum Isa : int { kUnset = -1, kBase = 0, kV4 = 1 };

bool built(int isa) {
#ifdef UMM_CPU_HAVE_V4
  return isa == kBase || isa == kV4;
#else
  return isa == kBase;
#endif
}

bool supported(int isa) {
  if (isa == kBase) return true;  // the whole module is compiled for it
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  if (isa == kV4) {
    __builtin_cpu_init();
    // x86-64-v4 = AVX-512 F/BW/CD/DQ/VL on top of v3 (libgcc checks that the OS saves the AVX-512 state)
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("avx512f") &&
           __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512cd") &&
           __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl");
  }
#endif
  return false;
}

const char* name_of(int isa) { return isa == kV4 ? "x86-64-v4" : UMM_CPU_BASE_NAME; }

std::string options() {
  std::string s;
  for (int i = kBase; i <= kV4; ++i) {
    if (!built(i)) continue;
    if (!s.empty()) s += ", ";
    s += std::string("'") + name_of(i) + "'" + (supported(i) ? "" : " (not supported by this CPU)");
  }
  return s + ", or 'auto'";
}

int widest() { return built(kV4) && supported(kV4) ? kV4 : kBase; }

int parse(const std::string& name, const char* who) {
  if (name.empty() || name == "auto") return widest();
  for (int i = kBase; i <= kV4; ++i) {
    if (built(i) && name == name_of(i)) {
      TORCH_CHECK(supported(i), who, ": CPU instruction set '", name, "' is built but this CPU does not support it; ",
                  "expected one of ", options());
      return i;
    }
  }
  TORCH_CHECK(false, who, ": unknown CPU instruction set '", name, "'; expected one of ", options());
  return kBase;
}

std::atomic<int> g_isa{kUnset};

int current() {
  int isa = g_isa.load(std::memory_order_relaxed);
  if (isa == kUnset) {
    const char* env = std::getenv("UMM_CPU_ISA");
    isa = parse(env ? std::string(env) : std::string(), "umm_ops (environment variable UMM_CPU_ISA)");
    g_isa.store(isa, std::memory_order_relaxed);
  }
  return isa;
}

}  // namespace

std::string cpu_isa() { return name_of(current()); }

std::vector<std::string> cpu_isas_built() {
  std::vector<std::string> out;
  for (int i = kBase; i <= kV4; ++i)
    if (built(i)) out.push_back(name_of(i));
  return out;
}

std::vector<std::string> cpu_isas() {
  std::vector<std::string> out;
  for (int i = kBase; i <= kV4; ++i)
    if (built(i) && supported(i)) out.push_back(name_of(i));
  return out;
}

void set_cpu_isa(const std::string& name) { g_isa.store(parse(name, "umm_ops.set_cpu_isa"), std::memory_order_relaxed); }

#ifdef UMM_CPU_HAVE_V4
#define UMM_CPU_DEFINE(NAME, P)                  \
  void NAME(const P& p, DType dt) {              \
    if (current() == kV4) return v4::NAME(p, dt); \
    base::NAME(p, dt);                           \
  }
#else
#define UMM_CPU_DEFINE(NAME, P) \
  void NAME(const P& p, DType dt) { base::NAME(p, dt); }
#endif
UMM_CPU_KERNELS(UMM_CPU_DEFINE)

}  // namespace umm::cpu
