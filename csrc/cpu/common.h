// Helpers shared by the CPU kernels: dtype <-> float conversion of short runs, fixed-order reductions.
//
// The kernels convert runs of up to kRun elements into float buffers on the stack, compute in float32 with
// plain loops that the compiler vectorises (-O3 -fopenmp-simd; -march=x86-64-v3 or x86-64-v4 per variant, see
// kernels.h), and convert back.
// Parallel work is cut into chunks whose size depends only on the problem shape, never on the thread
// count, and partial sums are added in chunk order: results are bitwise reproducible across thread counts.
#pragma once
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "umm/params.h"

namespace umm::cpu::UMM_CPU_NS {

constexpr int64_t kRun = 512;  // elements converted per run (2 KiB of floats per buffer)

// Element access with the conversion inline (vectorisable: bf16 <-> float is a shift plus rounding).
inline float ld(const float* p, int64_t i) { return p[i]; }
inline float ld(const c10::BFloat16* p, int64_t i) {
  uint32_t b = uint32_t(reinterpret_cast<const uint16_t*>(p)[i]) << 16;
  float f;
  std::memcpy(&f, &b, sizeof(float));
  return f;
}
inline float ld(const c10::Half* p, int64_t i) { return static_cast<float>(p[i]); }

inline uint16_t bf16_bits(float v) {
  uint32_t b;
  std::memcpy(&b, &v, sizeof(float));
  const uint32_t r = (b + 0x7fffu + ((b >> 16) & 1u)) >> 16;  // round to nearest even
  return (v != v) ? uint16_t(0x7fc0) : uint16_t(r);
}
inline void st(float* p, int64_t i, float v) { p[i] = v; }
inline void st(c10::BFloat16* p, int64_t i, float v) { reinterpret_cast<uint16_t*>(p)[i] = bf16_bits(v); }
inline void st(c10::Half* p, int64_t i, float v) { p[i] = c10::Half(v); }

// The value a store to T then a load gives back.
template <typename T>
inline float rt(float v) {
  if constexpr (std::is_same_v<T, float>) {
    return v;
  } else if constexpr (std::is_same_v<T, c10::BFloat16>) {
    uint32_t b = uint32_t(bf16_bits(v)) << 16;
    float f;
    std::memcpy(&f, &b, sizeof(float));
    return f;
  } else {
    return static_cast<float>(c10::Half(v));
  }
}

inline void load_f32(const float* s, float* d, int64_t n) { std::memcpy(d, s, n * sizeof(float)); }
inline void load_f32(const c10::BFloat16* s, float* d, int64_t n) {
  const uint16_t* u = reinterpret_cast<const uint16_t*>(s);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    uint32_t b = uint32_t(u[i]) << 16;
    std::memcpy(d + i, &b, sizeof(float));
  }
}
inline void load_f32(const c10::Half* s, float* d, int64_t n) {
  for (int64_t i = 0; i < n; ++i) d[i] = static_cast<float>(s[i]);
}

inline void store_f32(const float* s, float* d, int64_t n) { std::memcpy(d, s, n * sizeof(float)); }
inline void store_f32(const float* s, c10::BFloat16* d, int64_t n) {
  uint16_t* u = reinterpret_cast<uint16_t*>(d);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    uint32_t b;
    std::memcpy(&b, s + i, sizeof(float));
    const uint32_t r = (b + 0x7fffu + ((b >> 16) & 1u)) >> 16;  // round to nearest even
    u[i] = (s[i] != s[i]) ? uint16_t(0x7fc0) : uint16_t(r);
  }
}
inline void store_f32(const float* s, c10::Half* d, int64_t n) {
  for (int64_t i = 0; i < n; ++i) d[i] = c10::Half(s[i]);
}

// Round float values through dtype T and back (the value a store then load would give).
template <typename T>
inline void round_trip(float* buf, int64_t n) {
  if constexpr (!std::is_same_v<T, float>) {
    T tmp[kRun];
    store_f32(buf, tmp, n);
    load_f32(tmp, buf, n);
  }
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Runs fn(r0, r1, acc) over the rows [0, M) in chunks of max(min_rows, ceil(M / 256)) rows, in parallel.  With
// out != nullptr, each chunk accumulates column sums into its own zeroed float partial row acc[0, width), and
// out[j] = the sum over chunks, in chunk order and in double, of acc[j]: chunk sizes depend only on the shape,
// so the result is bitwise independent of the thread count.  With out == nullptr, acc is nullptr.
template <typename F>
void chunked_rows(int64_t M, int64_t min_rows, int64_t width, float* out, const F& fn) {
  const int64_t rpc = std::max<int64_t>(min_rows, ceil_div(M, 256)), nch = ceil_div(M, rpc);
  std::vector<float> part(out ? nch * width : 0, 0.f);
  at::parallel_for(0, nch, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t ch = c0; ch < c1; ++ch)
      fn(ch * rpc, std::min(M, (ch + 1) * rpc), out ? part.data() + ch * width : nullptr);
  });
  if (out == nullptr) return;
  at::parallel_for(0, width, 256, [&](int64_t j0, int64_t j1) {
    for (int64_t j = j0; j < j1; ++j) {
      double acc = 0.0;
      for (int64_t ch = 0; ch < nch; ++ch) acc += part[ch * width + j];
      out[j] = float(acc);
    }
  });
}

// Dispatch a DType to a template parameter.
#define UMM_CPU_DISPATCH(DTYPE, T, ...)                                   \
  [&] {                                                                   \
    switch (DTYPE) {                                                      \
      case ::umm::DType::kFloat32: {                                      \
        using T = float;                                                  \
        return __VA_ARGS__();                                             \
      }                                                                   \
      case ::umm::DType::kBFloat16: {                                     \
        using T = c10::BFloat16;                                          \
        return __VA_ARGS__();                                             \
      }                                                                   \
      case ::umm::DType::kFloat16: {                                      \
        using T = c10::Half;                                              \
        return __VA_ARGS__();                                             \
      }                                                                   \
    }                                                                     \
    TORCH_CHECK(false, "umm_ops: unsupported dtype code ", int(DTYPE));   \
  }()

}  // namespace umm::cpu::UMM_CPU_NS
