// Fused MoE-KD rows on the CPU (see moekd_cpu.h and csrc/common/moekd_math.h).
//
// Cost model: per class the loss needs 1 + 2L exps and L logs, which at
// ~1 ns per element per core outweigh reading s and t, so every exp is taken
// exactly once and kept. Each thread owns a scratch block of float rows and
// walks its rows one at a time, so a row's data stays in L1/L2 across passes:
//   1. max of s and of every t_ℓ/τ_ℓ (one read of the inputs), then
//      es = exp(s − max s), eq_ℓ = exp((s − max s)/τ_ℓ), et_ℓ = exp(t_ℓ/τ_ℓ − max)
//      and their sums: the only exps of the row.
//   2. per level, the RowSums of moekd_math.h from es, et_ℓ and s; et_ℓ is
//      overwritten with the class's pass-3 factor. The target class is left out
//      and added on its own, so its terms never cancel against the rest.
//   3. the gradient from es, eq_ℓ and those factors: two multiply-adds per
//      class and level, then the finished row is streamed to memory.
// Each pass is a function (pass1_exps, pass2_sums, pass3_gradient); process_row
// strings them together. The loss comes from finalize_row (moekd_math.h), which
// forms it in double from sums of one-signed terms; the target's gradient is
// finished the same way (target_gradient). Both stay accurate when the experts
// saturate and the textbook terms cancel.
// exp and log are polynomial versions that GCC vectorises under `omp simd`;
// both are within ~3 ulp of libm and keep the IEEE special cases (exp(−inf) = 0,
// NaN in → NaN out), which is why the build avoids -ffast-math.
// Sums over classes run in float within blocks of kSumBlock classes and in
// double across blocks, so C = 131072 loses no accuracy to long float sums.
#include "cpu/moekd_cpu.h"

#include <omp.h>

#if defined(__SSE2__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <type_traits>

#define MOEKD_INLINE inline __attribute__((always_inline))

namespace moekd {
namespace cpu {
namespace {

constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();
constexpr int64_t kSumBlock = 1024;

MOEKD_INLINE uint32_t bits_of(float x) {
  uint32_t b;
  std::memcpy(&b, &x, sizeof b);
  return b;
}

MOEKD_INLINE float float_of(uint32_t b) {
  float x;
  std::memcpy(&x, &b, sizeof x);
  return x;
}

#if defined(__FMA__) || defined(__ARM_FEATURE_FMA)
MOEKD_INLINE float mul_add(float a, float b, float c) { return std::fma(a, b, c); }
#else
// Without hardware FMA std::fma is a slow exact library call; the two roundings are fine here.
MOEKD_INLINE float mul_add(float a, float b, float c) { return a * b + c; }
#endif

// Cody–Waite split of ln 2: k · kLn2Hi is exact for |k| < 2^15, so x − k ln 2 loses nothing.
constexpr float kLn2Hi = 0.693359375f;
constexpr float kLn2Lo = -2.12194440e-4f;

// e^x = 2^k · e^r with k = round(x log2 e), |r| <= ln2/2, and a degree-5 minimax
// fit of e^r (our own Lawson fit; 9e-8 relative, 1.6e-7 = 2.7 ulp once evaluated in
// float). Adding 1.5·2^23 rounds to an integer without a float→int conversion,
// which would be undefined for NaN.
// Only for x <= 0 or NaN (every argument here is max-subtracted). x is first
// raised to kMinArg, where k = −127 makes the scale 2^k exactly 0: exp(−inf) = 0,
// results below ~2^-126 flush to 0, and a NaN passes the max (x86 maxps
// returns its second operand on NaN) and comes out NaN.
MOEKD_INLINE float fast_exp_nonpos(float x) {
  constexpr float kLog2e = 1.44269504088896341f;
  constexpr float kShift = 12582912.0f;  // 1.5 · 2^23
  constexpr float kMinArg = -88.0f;      // round(−88 log2 e) = −127
  x = x < kMinArg ? kMinArg : x;
  const float shifted = mul_add(x, kLog2e, kShift);
  const float k = shifted - kShift;
  float r = mul_add(k, -kLn2Hi, x);  // exact: k · kLn2Hi needs few bits
  r = mul_add(k, -kLn2Lo, r);
  float p = 0.008290297351777554f;
  p = mul_add(p, r, 0.041897911578416824f);
  p = mul_add(p, r, 0.1666763573884964f);
  p = mul_add(p, r, 0.4999915063381195f);
  p = mul_add(p, r, 0.9999997019767761f);
  p = mul_add(p, r, 1.0f);
  // 2^k from the integer in the low bits of `shifted`; 0 for k = −127.
  const float scale = float_of((bits_of(shifted) - (bits_of(kShift) - 127u)) << 23);
  return p * scale;
}

// ln x for x >= 1 (the expert normalisers D). x = 2^e · m with m in [√½, √2),
// found by offsetting the bits by those of √½ (no compare, no float multiply).
// ln m = 2 atanh(s) = s Q(s²), s = (m − 1)/(m + 1), |s| <= 0.1716, Q a degree-3
// minimax fit (our own; 8e-10 relative): within ~3 ulp, which only the loss
// value sees (Σ r log D), never the gradient. +inf and NaN pass through.
MOEKD_INLINE float fast_log_ge1(float x) {
  const int32_t offset = static_cast<int32_t>(bits_of(x) - 0x3f3504f3u);
  const int32_t e = offset >> 23;
  const float m = float_of(bits_of(x) - (static_cast<uint32_t>(e) << 23));
  const float f = m - 1.0f;  // exact (Sterbenz)
  const float s = f / (2.0f + f);
  const float z = s * s;
  float Q = 0.29870855808258057f;
  Q = mul_add(Q, z, 0.39977577328681946f);
  Q = mul_add(Q, z, 0.6666677594184875f);
  Q = mul_add(Q, z, 2.0f);
  const float ef = static_cast<float>(e);
  const float y = mul_add(ef, kLn2Hi, mul_add(ef, kLn2Lo, s * Q));
  return x < kInf ? y : x;
}

// log1p(x) for x >= 0 given D = 1 + x (rounded) and 1/D: ln D plus the
// first-order correction for the rounding of 1 + x, as accurate as log1p.
MOEKD_INLINE float log1p_from(float x, float D, float inv_D) {
  return mul_add(x - (D - 1.0f), inv_D, fast_log_ge1(D));
}

// ---- element types ---------------------------------------------------------------

struct BF16 {
  uint16_t bits;
};
struct F16 {
  uint16_t bits;
};

MOEKD_INLINE float to_float(float x) { return x; }
MOEKD_INLINE float to_float(double x) { return static_cast<float>(x); }
MOEKD_INLINE float to_float(BF16 x) { return float_of(static_cast<uint32_t>(x.bits) << 16); }
MOEKD_INLINE float to_float(F16 h) {
  const uint32_t sign = static_cast<uint32_t>(h.bits & 0x8000u) << 16;
  const uint32_t em = h.bits & 0x7fffu;
  // Placing exponent and mantissa at float positions and scaling by 2^112
  // rebiases normal and subnormal halves alike; inf/NaN keep their mantissa.
  float mag = float_of(em << 13) * 0x1p112f;
  mag = em >= 0x7c00u ? float_of((em << 13) | 0x7f800000u) : mag;
  return float_of(bits_of(mag) | sign);
}

MOEKD_INLINE void store(float* p, float v) { *p = v; }
MOEKD_INLINE void store(BF16* p, float v) {
  const uint32_t b = bits_of(v);
  const uint32_t rounded = (b + 0x7fffu + ((b >> 16) & 1u)) >> 16;  // nearest, ties to even
  p->bits = static_cast<uint16_t>(v != v ? ((b >> 16) | 0x40u) : rounded);  // NaN stays NaN
}
MOEKD_INLINE void store(F16* p, float v) {
  const uint32_t b = bits_of(v);
  const uint32_t sign = (b >> 16) & 0x8000u;
  const uint32_t a = b & 0x7fffffffu;
  // Normal halves: rebias the exponent (127 → 15) and round the 13 dropped bits to even.
  const uint32_t normal = (a - ((127u - 15u) << 23) + 0xfffu + ((a >> 13) & 1u)) >> 13;
  // Below 2^-14: adding 0.5 makes the FPU round to the half subnormal grid (2^-24).
  const uint32_t subnormal = bits_of(float_of(a) + 0.5f) - bits_of(0.5f);
  uint32_t h = a < (113u << 23) ? subnormal : normal;
  h = a >= (143u << 23) ? 0x7c00u : h;  // >= 65536: inf
  h = a > 0x7f800000u ? 0x7e00u : h;    // NaN
  p->bits = static_cast<uint16_t>(h | sign);
}

template <typename T>
void fill_row(T* row, int64_t n, float value) {
  for (int64_t c = 0; c < n; ++c) store(row + c, value);
}

// ---- the row kernel -----------------------------------------------------------------

// Per-thread scratch rows (floats, 64-byte aligned, length `stride` each).
struct Scratch {
  float* es;                 // exp(s − max s)
  float* eq[kMaxLevels];     // exp((s − max s)/τ_ℓ)
  float* et[kMaxLevels];     // t_ℓ/τ_ℓ → exp(t_ℓ/τ_ℓ − max) → pass-3 factor u (λ_e x/D − λ_g τ)
  float* sf;                 // s as float (low-precision students), later the float gradient
  void* out;                 // the finished gradient row in the output dtype, before streaming out
};

// Copies a finished row to the gradient with non-temporal stores where the CPU
// has them: the N×C gradient is written once and read back only by the
// backward pass, so caching it would only fetch each line first (a read for
// ownership, a third of the kernel's memory traffic) and evict the scratch rows.
void stream_out(void* dst, const void* src, size_t bytes) {
#if defined(__SSE2__)
  char* d = static_cast<char*>(dst);
  const char* s = static_cast<const char*>(src);
  const size_t head = std::min(bytes, (64 - reinterpret_cast<uintptr_t>(d) % 64) % 64);
  std::memcpy(d, s, head);
  d += head;
  s += head;
  bytes -= head;
  const size_t body = bytes & ~size_t{63};
  for (size_t i = 0; i < body; i += 64) {
#if defined(__AVX512F__)
    _mm512_stream_si512(reinterpret_cast<__m512i*>(d + i),
                        _mm512_loadu_si512(reinterpret_cast<const void*>(s + i)));
#elif defined(__AVX__)
    _mm256_stream_si256(reinterpret_cast<__m256i*>(d + i),
                        _mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + i)));
    _mm256_stream_si256(reinterpret_cast<__m256i*>(d + i + 32),
                        _mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + i + 32)));
#else
    for (size_t k = 0; k < 64; k += 16)
      _mm_stream_si128(reinterpret_cast<__m128i*>(d + i + k),
                       _mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i + k)));
#endif
  }
  std::memcpy(d + body, s + body, bytes - body);
  _mm_sfence();  // streamed stores are weakly ordered: publish them before the row is done
#else
  std::memcpy(dst, src, bytes);
#endif
}

// out[c] = exp((s[c] − s_max) · scale); returns Σ_c out[c]. out may be s (in place).
MOEKD_INLINE double exp_scaled_sum(const float* s, float* out, int64_t C, float s_max,
                                   float scale) {
  double total = 0.0;
  for (int64_t b0 = 0; b0 < C; b0 += kSumBlock) {
    const int64_t b1 = std::min(C, b0 + kSumBlock);
    float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
    for (int64_t c = b0; c < b1; ++c) {
      const float e = fast_exp_nonpos((s[c] - s_max) * scale);
      out[c] = e;
      acc += e;
    }
    total += acc;
  }
  return total;
}

// Pass-2 terms of one class at one level, before the level weight w_ℓ/Z_t and
// the target's boost exp(β) (both constant factors, applied to the sums).
// `grad_factor` is what pass 3 needs of this class: u (λ_e x/D − λ_g τ), so that
// r_ℓc (λ_e x/D − λ_g τ) = grad_factor · w_ℓ/(Z_t G) costs pass 3 one multiply.
struct ClassTerms {
  float u, u_over_D, log_D, grad_factor;
};

// e = exp(s_c − max s), x_scale = expm1(β)/Z_s (so x = expm1(β) σ_c), lam_e_x_scale = λ_e x_scale.
MOEKD_INLINE ClassTerms class_terms(float exp_t, float e, float x_scale, float lam_e_x_scale,
                                    float gate_tau) {
  const float x = x_scale * e;
  const float D = 1.0f + x;
  const float inv_D = 1.0f / D;
  ClassTerms t;
  t.u = exp_t * inv_D;
  t.u_over_D = t.u * inv_D;
  t.log_D = log1p_from(x, D, inv_D);
  // λ_e x/D, not λ_e (1 − 1/D): no cancellation for small x.
  t.grad_factor = mul_add(lam_e_x_scale * e, t.u_over_D, -gate_tau * t.u);
  return t;
}

// What pass 1 leaves for passes 2 and 3 (the exps themselves are in the scratch rows).
struct Pass1 {
  const float* s;                  // the student row as float (in place, or the scratch row sf)
  float s_max;                     // max_c s_c
  double Zs;                       // Σ exp(s − max s)
  double Zt[kMaxLevels];           // Σ exp(t_ℓ/τ_ℓ − max)
  double Zq[kMaxLevels];           // Σ exp((s − max s)/τ_ℓ)
};

// The teacher loaders: each writes t_ℓ/τ_ℓ of row n into the float scratch row et
// and returns its maximum, and the passes run the same after either.

// A dense teacher (L, N, C) of dtype TT, read once.
template <typename TT>
struct DenseTeacher {
  static MOEKD_INLINE float load_scaled(const RowsArgs& a, int l, int64_t n, float inv_tau, float* et,
                                        int64_t C) {
    // A level stride of 0 (one teacher head at L temperatures) reads the same row L times.
    const TT* t_in = static_cast<const TT*>(a.teacher) + l * a.teacher_level_stride +
                     n * a.teacher_row_stride;
    float t_max = -kInf;
#pragma omp simd reduction(max : t_max)
    for (int64_t c = 0; c < C; ++c) {
      const float v = to_float(t_in[c]) * inv_tau;
      et[c] = v;
      t_max = v > t_max ? v : t_max;
    }
    return t_max;
  }

  // et = exp(t_ℓ/τ_ℓ − m), m = *shift or (nullptr) the row's maximum; returns Σ et.
  static MOEKD_INLINE double load_exp(const RowsArgs& a, int l, int64_t n, float inv_tau, float* et,
                                      int64_t C, const float* shift) {
    const float t_max = load_scaled(a, l, n, inv_tau, et, C);
    return exp_scaled_sum(et, et, C, shift != nullptr ? *shift : t_max, 1.0f);
  }
};

// A top-k teacher with values of dtype TV: the rest logit at every class, then the
// listed values written over it; its cost is C stores and K reads, never an N×C buffer.
template <typename TV>
struct TopKTeacher {
  // Calls visit(c, v / τ) for each listed entry of row n, level l whose class c lies in this
  // slice (padding and other slices' classes skipped); returns how many it visited.
  template <typename Visit>
  static MOEKD_INLINE int64_t for_each_listed(const RowsArgs& a, int l, int64_t n, float inv_tau,
                                              int64_t C, Visit&& visit) {
    const int64_t* idx = a.topk_indices + l * a.topk_index_strides[0] + n * a.topk_index_strides[1];
    const TV* val = static_cast<const TV*>(a.topk_values) + l * a.topk_value_strides[0] +
                    n * a.topk_value_strides[1];
    const int64_t ik = a.topk_index_strides[2], vk = a.topk_value_strides[2];
    int64_t listed = 0;
    for (int64_t k = 0; k < a.topk_k; ++k) {
      const float v = to_float(val[k * vk]);
      const int64_t c = idx[k * ik] - a.class_offset;
      if (v == -kInf || c < 0 || c >= C) continue;
      visit(c, v * inv_tau);
      ++listed;
    }
    return listed;
  }

  static MOEKD_INLINE float rest_scaled(const RowsArgs& a, int l, int64_t n, float inv_tau) {
    return a.topk_rest[l * a.topk_rest_strides[0] + n * a.topk_rest_strides[1]] * inv_tau;
  }

  // The row's largest t/τ: the listed values', and the rest logit's where a class is left
  // unlisted (a NaN value is skipped here and summed later).
  static MOEKD_INLINE float scaled_max(const RowsArgs& a, int l, int64_t n, float inv_tau, int64_t C,
                                       float rest, int64_t* listed) {
    float t_max = -kInf;
    *listed = for_each_listed(a, l, n, inv_tau, C, [&](int64_t, float x) {
      t_max = x > t_max ? x : t_max;
    });
    return *listed < C && rest > t_max ? rest : t_max;
  }

  static MOEKD_INLINE float load_scaled(const RowsArgs& a, int l, int64_t n, float inv_tau, float* et,
                                        int64_t C) {
    const float rest = rest_scaled(a, l, n, inv_tau);
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) et[c] = rest;
    float t_max = -kInf;
    const int64_t listed = for_each_listed(a, l, n, inv_tau, C, [&](int64_t c, float x) {
      et[c] = x;
      t_max = x > t_max ? x : t_max;
    });
    return listed < C && rest > t_max ? rest : t_max;
  }

  // load_scaled's row, exponentiated: every unlisted class shares one exp, so the row costs
  // K + 1 exps and C stores instead of C exps. The sum is formed in double.
  static MOEKD_INLINE double load_exp(const RowsArgs& a, int l, int64_t n, float inv_tau, float* et,
                                      int64_t C, const float* shift) {
    const float rest = rest_scaled(a, l, n, inv_tau);
    int64_t listed = 0;
    const float t_max = scaled_max(a, l, n, inv_tau, C, rest, &listed);
    const float m = shift != nullptr ? *shift : t_max;
    const float e_rest = fast_exp_nonpos(rest - m);
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) et[c] = e_rest;
    double total = listed < C ? static_cast<double>(C - listed) * e_rest : 0.0;
    for_each_listed(a, l, n, inv_tau, C, [&](int64_t c, float x) {
      const float e = fast_exp_nonpos(x - m);
      et[c] = e;
      total += e;
    });
    return total;
  }
};

// Pass 1: maxima, then every exp of the row, each taken once and kept in the scratch
// rows: es = exp(s − max s), eq_ℓ = exp((s − max s)/τ_ℓ), et_ℓ = exp(t_ℓ/τ_ℓ − max).
template <typename TS, typename Teacher>
Pass1 pass1_exps(const RowsArgs& a, const Params& p, int64_t n, const Scratch& sc) {
  const int64_t C = a.num_classes;
  const int L = p.num_levels;
  Pass1 r;
  const TS* s_in = static_cast<const TS*>(a.student) + n * a.student_row_stride;
  float s_max = -kInf;
  if (std::is_same<TS, float>::value) {
    const float* s = reinterpret_cast<const float*>(s_in);
#pragma omp simd reduction(max : s_max)
    for (int64_t c = 0; c < C; ++c) s_max = s[c] > s_max ? s[c] : s_max;
    r.s = s;
  } else {
    float* sf = sc.sf;
#pragma omp simd reduction(max : s_max)
    for (int64_t c = 0; c < C; ++c) {
      const float v = to_float(s_in[c]);
      sf[c] = v;
      s_max = v > s_max ? v : s_max;
    }
    r.s = sf;
  }
  // A NaN logit is skipped by max but reaches the sums through exp: NaN still propagates.
  r.s_max = s_max;

  for (int l = 0; l < L; ++l) {
    float* et = sc.et[l];
    r.Zt[l] = Teacher::load_exp(a, l, n, p.inv_tau[l], et, C, nullptr);
  }
  r.Zs = exp_scaled_sum(r.s, sc.es, C, s_max, 1.0f);
  for (int l = 0; l < L; ++l) r.Zq[l] = exp_scaled_sum(r.s, sc.eq[l], C, s_max, p.inv_tau[l]);
  return r;
}

// What pass 2 leaves: the RowSums for finalize_row, and the per-level and target
// terms that pass 3 and the target's gradient need.
struct Pass2 {
  RowSums sums;
  double u_rest;                       // Σ_ℓ Σ_{c≠y} u_ℓc
  double level_scale[kMaxLevels];      // u_ℓc = level_scale · class_terms(...).u
  double u_y[kMaxLevels];              // u_ℓy
  double u_y_over_D[kMaxLevels];       // u_ℓy / D_ℓy
};

// Pass 2: RowSums, level by level; et_ℓ becomes the pass-3 factor of each class.
// The target class is left out of the vectorised sums (its et is zeroed, so all
// its terms vanish) and added afterwards with its boost exp(β): no sum ever
// subtracts the target back out, and the rest G − Σ_ℓ u_ℓy stays exact for
// the target's gradient.
inline Pass2 pass2_sums(const Params& p, int64_t C, int64_t y, const Pass1& r1, const Scratch& sc) {
  const int L = p.num_levels;
  const float* s = r1.s;
  const float s_max = r1.s_max;
  const float s_y = s[y];
  const float lam_e = p.expert_weight;
  Pass2 r2;
  row_sums_clear(r2.sums, L);
  double u_rest = 0.0;                    // Σ_ℓ Σ_{c≠y} u_ℓc
  double u_over_D = 0.0;                  // Σ_ℓc u_ℓc / D_ℓc
  double u_log_D_rest = 0.0;              // Σ_ℓ Σ_{c≠y} u_ℓc log D_ℓc
  for (int l = 0; l < L; ++l) {
    float* et = sc.et[l];
    const float* es = sc.es;
    const float x_scale = static_cast<float>(p.expm1_beta[l] / r1.Zs);  // x = expm1(β) σ = x_scale · es
    const float lam_e_x_scale = lam_e * x_scale;
    const float gate_tau = p.gate_weight * p.tau[l];
    const float inv_tau = p.inv_tau[l];
    // log q_ℓc = (s_c − max s)/τ − log Z_q; s_c − max s is exact near the max.
    const float log_Zq = static_cast<float>(std::log(r1.Zq[l]));
    const float exp_t_y = et[y];
    et[y] = 0.0f;
    double sum_u = 0.0, sum_u_over_D = 0.0, sum_u_log_D = 0.0, sum_u_log_q = 0.0;
    for (int64_t b0 = 0; b0 < C; b0 += kSumBlock) {
      const int64_t b1 = std::min(C, b0 + kSumBlock);
      float acc_u = 0.0f, acc_uD = 0.0f, acc_ulogD = 0.0f, acc_ulogq = 0.0f;
#pragma omp simd reduction(+ : acc_u, acc_uD, acc_ulogD, acc_ulogq)
      for (int64_t c = b0; c < b1; ++c) {
        const ClassTerms t = class_terms(et[c], es[c], x_scale, lam_e_x_scale, gate_tau);
        const float log_q = mul_add(s[c] - s_max, inv_tau, -log_Zq);
        et[c] = t.grad_factor;
        acc_u += t.u;
        acc_uD += t.u_over_D;
        acc_ulogD = mul_add(t.u, t.log_D, acc_ulogD);
        // 0 · log 0 = 0 for classes masked in teacher and student alike.
        acc_ulogq = mul_add(t.u, t.u == 0.0f ? 0.0f : log_q, acc_ulogq);
      }
      sum_u += acc_u;
      sum_u_over_D += acc_uD;
      sum_u_log_D += acc_ulogD;
      sum_u_log_q += acc_ulogq;
    }
    const double scale = p.level_weight[l] / r1.Zt[l];  // w_ℓ π_ℓc = scale · et_ℓc
    r2.level_scale[l] = scale;
    u_rest += scale * sum_u;
    u_log_D_rest += scale * sum_u_log_D;  // the target's log D is in row_loss's closed form

    // The target, boosted by exp(β).
    const ClassTerms ty = class_terms(exp_t_y, es[y], x_scale, lam_e_x_scale, gate_tau);
    const double boost = p.exp_beta[l];
    const double u_target = boost * ty.u;
    sum_u += u_target;
    sum_u_over_D += boost * ty.u_over_D;
    if (ty.u != 0.0f)
      sum_u_log_q += u_target * ((static_cast<double>(s_y) - s_max) * inv_tau - std::log(r1.Zq[l]));
    et[y] = 0.0f;  // pass 3 leaves g_y to target_gradient
    r2.u_y[l] = scale * u_target;
    r2.u_y_over_D[l] = scale * boost * ty.u_over_D;

    u_over_D += scale * sum_u_over_D;
    r2.sums.u_level[l] = static_cast<float>(scale * sum_u);
    r2.sums.u_log_q[l] = static_cast<float>(scale * sum_u_log_q);
    r2.sums.u_target[l] = static_cast<float>(r2.u_y[l]);
  }
  r2.u_rest = u_rest;
  r2.sums.u_rest = static_cast<float>(u_rest);
  r2.sums.u_over_D = static_cast<float>(u_over_D);
  r2.sums.u_log_D_rest = static_cast<float>(u_log_D_rest);
  return r2;
}

// Pass 3: the gradient into g (floats), the target's element excepted:
//   g_j = λ_e A σ_j − λ_e [j = y] + Σ_ℓ [ r_ℓj (λ_e x_ℓj/D_ℓj − λ_g τ_ℓ) + λ_g τ_ℓ R_ℓ q_ℓj ]
// Every term is linear in a per-row coefficient, so grad_scale w rides on those
// coefficients (formed in double): the scaled gradient costs no extra pass or multiply.
inline void pass3_gradient(float* g, const Params& p, int64_t C, double w, const Pass1& r1, const Pass2& r2,
                           const RowResult& row, const Scratch& sc) {
  const int L = p.num_levels;
  const float sigma_coeff = static_cast<float>(w * (p.expert_weight * row.A / r1.Zs));  // λ_e A σ_j = · es_j
  const float inv_G = row.inv_G;
  for (int l = 0; l < L; ++l) {
    const float* es = sc.es;
    const float* factor = sc.et[l];
    const float* eq = sc.eq[l];
    const float q_coeff = static_cast<float>(w * (p.gate_weight * p.tau[l] * row.R[l] / r1.Zq[l]));
    const float r_coeff = static_cast<float>(w * (inv_G * r2.level_scale[l]));  // r_ℓj = r_coeff · u_ℓj
    if (l == 0) {
#pragma omp simd
      for (int64_t j = 0; j < C; ++j)
        g[j] = mul_add(sigma_coeff, es[j], mul_add(r_coeff, factor[j], q_coeff * eq[j]));
    } else {
#pragma omp simd
      for (int64_t j = 0; j < C; ++j) g[j] += mul_add(r_coeff, factor[j], q_coeff * eq[j]);
    }
  }
}

// The target's gradient element. Its expert part is λ_e (σ_y A − 1 + Σ_ℓ r_ℓy (1 − 1/D_ℓy)),
// which cancels to nearly 0 once the experts saturate (r_y → 1). With
// Σ_ℓ r_ℓy = 1 − u_rest/G it is λ_e (σ_y A − u_rest/G − Σ_ℓ r_ℓy/D_ℓy): no cancellation left.
inline float target_gradient(const Params& p, double w, float s_y, double log_sigma_y, const Pass1& r1,
                             const Pass2& r2, const RowResult& row) {
  const int L = p.num_levels;
  double G = r2.u_rest;
  for (int l = 0; l < L; ++l) G += r2.u_y[l];
  double expert = std::exp(log_sigma_y) * row.A - r2.u_rest / G;
  double gate = 0.0;
  for (int l = 0; l < L; ++l) {
    expert -= r2.u_y_over_D[l] / G;
    const double q_y = std::exp((s_y - static_cast<double>(r1.s_max)) * p.inv_tau[l]) / r1.Zq[l];
    gate += static_cast<double>(p.gate_weight) * p.tau[l] * (row.R[l] * q_y - r2.u_y[l] / G);
  }
  const float lam_e = p.expert_weight;
  return static_cast<float>(w * ((lam_e != 0.0f ? lam_e * expert : 0.0) + gate));
}

// Converts the float gradient row to the output dtype (float rows are already in
// sc.out) and streams it to the gradient.
template <typename TS>
void store_gradient(TS* grad_row, const float* g, int64_t C, const Scratch& sc) {
  if (!std::is_same<TS, float>::value) {
    TS* out = static_cast<TS*>(sc.out);
#pragma omp simd
    for (int64_t j = 0; j < C; ++j) store(out + j, g[j]);
  }
  stream_out(grad_row, sc.out, sizeof(TS) * C);
}

// One row: its special cases, then the three passes. a.grad == nullptr (need_grad
// false) stops after pass 2: the loss and stats do not depend on pass 3.
template <typename TS, typename Teacher>
void process_row(const RowsArgs& a, const Params& p, int64_t n, const Scratch& sc) {
  const int64_t C = a.num_classes;
  TS* grad_row = a.grad != nullptr ? static_cast<TS*>(a.grad) + n * C : nullptr;
  const int64_t y = a.target[n];
  if (y == p.ignore_index) {
    a.loss[n] = a.log_likelihood[n] = a.agreement[n] = 0.0f;
    if (grad_row != nullptr) std::memset(static_cast<void*>(grad_row), 0, sizeof(TS) * C);
    return;
  }
  if (y < 0 || y >= C) {
    a.loss[n] = a.log_likelihood[n] = a.agreement[n] = kNaN;
    if (grad_row != nullptr) fill_row(grad_row, C, kNaN);
    return;
  }

  const Pass1 r1 = pass1_exps<TS, Teacher>(a, p, n, sc);
  const float s_y = r1.s[y];  // s may live in the scratch row that pass 3 overwrites
  const double log_sigma_y = (static_cast<double>(s_y) - r1.s_max) - std::log(r1.Zs);
  const Pass2 r2 = pass2_sums(p, C, y, r1, sc);
  const RowResult row = finalize_row(r2.sums, p, log_sigma_y);
  a.loss[n] = row.loss;
  a.log_likelihood[n] = row.log_likelihood;
  a.agreement[n] = row.agreement;
  if (grad_row == nullptr) return;

  float* g = std::is_same<TS, float>::value ? static_cast<float*>(sc.out) : sc.sf;
  const double w = a.grad_scale;
  pass3_gradient(g, p, C, w, r1, r2, row, sc);
  g[y] = target_gradient(p, w, s_y, log_sigma_y, r1, r2, row);
  store_gradient(grad_row, g, C, sc);
}

template <typename TS, typename Teacher>
void run(const RowsArgs& a, const Params& p, int num_threads) {
  const int64_t N = a.num_rows, C = a.num_classes;
  if (N <= 0 || C <= 0) return;
  const int L = p.num_levels;
  const int64_t stride = (C + 15) & ~int64_t{15};  // 64-byte aligned rows
  const bool need_grad = a.grad != nullptr;
  // es, eq_ℓ, et_ℓ, sf, and the output row only where a gradient is written.
  const int64_t rows_per_thread = (need_grad ? 3 : 2) + 2 * static_cast<int64_t>(L);
  int threads = num_threads > 0 ? num_threads : omp_get_max_threads();
  threads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(threads, N)));
  // Allocated here, not inside the parallel region, so a bad_alloc reaches the caller.
  const int64_t per_thread = stride * rows_per_thread;
  std::unique_ptr<float[]> storage(new float[per_thread * threads + 16]);
  float* base = storage.get();
  base += (16 - (reinterpret_cast<uintptr_t>(base) / sizeof(float)) % 16) % 16;
  const int64_t chunk = std::max<int64_t>(1, 4096 / C);  // amortise scheduling for small C

#pragma omp parallel num_threads(threads)
  {
    float* mine = base + per_thread * omp_get_thread_num();
    Scratch sc;
    sc.es = mine;
    for (int l = 0; l < L; ++l) {
      sc.eq[l] = mine + stride * (1 + l);
      sc.et[l] = mine + stride * (1 + L + l);
    }
    sc.sf = mine + stride * (1 + 2 * L);
    sc.out = need_grad ? mine + stride * (2 + 2 * L) : nullptr;
#pragma omp for schedule(dynamic, chunk)
    for (int64_t n = 0; n < N; ++n) process_row<TS, Teacher>(a, p, n, sc);
  }
}

template <typename TS>
void dispatch_teacher(const RowsArgs& a, const Params& p, int num_threads) {
  if (a.teacher == nullptr) {
    switch (a.topk_values_dtype) {
      case DType::kFloat32: return run<TS, TopKTeacher<float>>(a, p, num_threads);
      case DType::kBFloat16: return run<TS, TopKTeacher<BF16>>(a, p, num_threads);
      case DType::kFloat16: return run<TS, TopKTeacher<F16>>(a, p, num_threads);
      case DType::kFloat64: return run<TS, TopKTeacher<double>>(a, p, num_threads);
    }
    return;
  }
  switch (a.teacher_dtype) {
    case DType::kFloat32: return run<TS, DenseTeacher<float>>(a, p, num_threads);
    case DType::kBFloat16: return run<TS, DenseTeacher<BF16>>(a, p, num_threads);
    case DType::kFloat16: return run<TS, DenseTeacher<F16>>(a, p, num_threads);
    case DType::kFloat64: return run<TS, DenseTeacher<double>>(a, p, num_threads);
  }
}


// ---- the phases over a class slice ------------------------------------------------------

// Per-thread scratch of the phases: float rows of the slice's width.
struct PhaseScratch {
  float* es;   // σ or exp(s − M)
  float* et;   // one level's teacher row
  float* sf;   // s as float (low-precision students)
  float* g;    // the float gradient row
  void* out;   // the gradient row in the output dtype
};

template <typename TS>
MOEKD_INLINE const float* student_row(const RowsArgs& a, int64_t n, float* sf) {
  const TS* s_in = static_cast<const TS*>(a.student) + n * a.student_row_stride;
  if (std::is_same<TS, float>::value) return reinterpret_cast<const float*>(s_in);
#pragma omp simd
  for (int64_t c = 0; c < a.num_classes; ++c) sf[c] = to_float(s_in[c]);
  return sf;
}

MOEKD_INLINE float row_max(const float* x, int64_t C) {
  float m = -kInf;
#pragma omp simd reduction(max : m)
  for (int64_t c = 0; c < C; ++c) m = x[c] > m ? x[c] : m;
  return m;
}

// The target's index in this slice, or −1 where another slice holds it (or it is ignored).
MOEKD_INLINE int64_t local_target(const RowsArgs& a, const Params& p, int64_t n) {
  const int64_t y = a.target[n];
  const int64_t local = y - a.class_offset;
  return y == p.ignore_index || local < 0 || local >= a.num_classes ? -1 : local;
}

template <typename TS, typename Teacher>
void maxima_row(const PhaseArgs& a, const Params& p, int64_t n, const PhaseScratch& sc) {
  const int64_t C = a.rows.num_classes, N = a.rows.num_rows;
  a.row_out[n] = row_max(student_row<TS>(a.rows, n, sc.sf), C);
  for (int l = 0; l < p.num_levels; ++l)
    a.row_out[(1 + l) * N + n] = Teacher::load_scaled(a.rows, l, n, p.inv_tau[l], sc.et, C);
}

template <typename TS, typename Teacher>
void sums_of_exp_row(const PhaseArgs& a, const Params& p, int64_t n, const PhaseScratch& sc) {
  const int64_t C = a.rows.num_classes, N = a.rows.num_rows;
  const int L = p.num_levels;
  const float* s = student_row<TS>(a.rows, n, sc.sf);
  const float M = a.row_in[n];  // the global maxima: every exponent is <= 0
  a.row_out[n] = static_cast<float>(exp_scaled_sum(s, sc.es, C, M, 1.0f));
  for (int l = 0; l < L; ++l)
    a.row_out[(1 + l) * N + n] = static_cast<float>(exp_scaled_sum(s, sc.es, C, M, p.inv_tau[l]));
  for (int l = 0; l < L; ++l) {
    a.row_out[(1 + L + l) * N + n] = static_cast<float>(
        Teacher::load_exp(a.rows, l, n, p.inv_tau[l], sc.et, C, &a.row_in[(1 + l) * N + n]));
  }
}

// The normalisers of row n as the phases pass them: max_s, lse_s, log_z_q (L), lse_t (L).
struct RowNorm {
  float max_s, lse_s, log_z_q[kMaxLevels], lse_t[kMaxLevels];
};

MOEKD_INLINE RowNorm row_norm(const PhaseArgs& a, int L, int64_t n) {
  const int64_t N = a.rows.num_rows;
  RowNorm r;
  r.max_s = a.row_in[n];
  r.lse_s = a.row_in[N + n];
  for (int l = 0; l < L; ++l) {
    r.log_z_q[l] = a.row_in[(2 + l) * N + n];
    r.lse_t[l] = a.row_in[(2 + L + l) * N + n];
  }
  return r;
}

template <typename TS, typename Teacher>
void estep_row(const PhaseArgs& a, const Params& p, int64_t n, const PhaseScratch& sc) {
  const int64_t C = a.rows.num_classes, N = a.rows.num_rows;
  const int L = p.num_levels;
  if (a.rows.target[n] == p.ignore_index) {  // finalize gives such rows 0 whatever their sums
    for (int k = 0; k < 3 + 3 * L; ++k) a.row_out[k * N + n] = 0.0f;
    return;
  }
  const int64_t y = local_target(a.rows, p, n);
  const float* s = student_row<TS>(a.rows, n, sc.sf);
  const RowNorm nm = row_norm(a, L, n);
  exp_scaled_sum(s, sc.es, C, nm.lse_s, 1.0f);  // σ
  double u_over_D = 0.0, u_log_D = 0.0;
  for (int l = 0; l < L; ++l) {
    float* et = sc.et;
    Teacher::load_exp(a.rows, l, n, p.inv_tau[l], et, C, &nm.lse_t[l]);  // π_ℓ
    const float x_scale = static_cast<float>(p.expm1_beta[l]);
    const float inv_tau = p.inv_tau[l];
    const float log_Zq = nm.log_z_q[l];
    const float pi_y = y >= 0 ? et[y] : 0.0f;
    if (y >= 0) et[y] = 0.0f;  // the target is added with its boost below
    double sum_u = 0.0, sum_uD = 0.0, sum_ulogD = 0.0, sum_ulogq = 0.0;
    for (int64_t b0 = 0; b0 < C; b0 += kSumBlock) {
      const int64_t b1 = std::min(C, b0 + kSumBlock);
      float acc_u = 0.0f, acc_uD = 0.0f, acc_ulogD = 0.0f, acc_ulogq = 0.0f;
#pragma omp simd reduction(+ : acc_u, acc_uD, acc_ulogD, acc_ulogq)
      for (int64_t c = b0; c < b1; ++c) {
        const ClassTerms t = class_terms(et[c], sc.es[c], x_scale, 0.0f, 0.0f);
        const float log_q = mul_add(s[c] - nm.max_s, inv_tau, -log_Zq);
        acc_u += t.u;
        acc_uD += t.u_over_D;
        acc_ulogD = mul_add(t.u, t.log_D, acc_ulogD);
        acc_ulogq = mul_add(t.u, t.u == 0.0f ? 0.0f : log_q, acc_ulogq);  // 0 · log 0 = 0
      }
      sum_u += acc_u;
      sum_uD += acc_uD;
      sum_ulogD += acc_ulogD;
      sum_ulogq += acc_ulogq;
    }
    double u_y = 0.0;
    if (y >= 0) {
      const double x = p.expm1_beta[l] * static_cast<double>(sc.es[y]);
      const double D = 1.0 + x;
      u_y = p.exp_beta[l] * pi_y / D;
      sum_u += u_y;
      sum_uD += u_y / D;
      sum_ulogD += u_y * std::log1p(x);
      if (u_y != 0.0)
        sum_ulogq += u_y * ((static_cast<double>(s[y]) - nm.max_s) * inv_tau - log_Zq);
    }
    const double w = p.level_weight[l];
    u_over_D += w * sum_uD;
    u_log_D += w * sum_ulogD;
    a.row_out[(3 + l) * N + n] = static_cast<float>(w * sum_u);
    a.row_out[(3 + L + l) * N + n] = static_cast<float>(w * sum_ulogq);
    a.row_out[(3 + 2 * L + l) * N + n] = static_cast<float>(w * u_y);
  }
  a.row_out[n] = static_cast<float>(u_over_D);
  a.row_out[N + n] = static_cast<float>(u_log_D);
  a.row_out[2 * N + n] = y >= 0 ? static_cast<float>(static_cast<double>(s[y]) - nm.lse_s) : 0.0f;
}

// g_j = λ_e (σ_j A + Σ_ℓ r_ℓj x_ℓj/D_ℓj − [j = y]) + λ_g Σ_ℓ τ_ℓ (R_ℓ q_ℓj − r_ℓj), times grad_scale;
// the target's element in double.
template <typename TS, typename Teacher>
void gradient_row(const PhaseArgs& a, const Params& p, int64_t n, const PhaseScratch& sc) {
  const int64_t C = a.rows.num_classes, N = a.rows.num_rows;
  const int L = p.num_levels;
  TS* grad_row = static_cast<TS*>(a.rows.grad) + n * C;
  if (a.rows.target[n] == p.ignore_index) {
    std::memset(static_cast<void*>(grad_row), 0, sizeof(TS) * C);
    return;
  }
  const int64_t y = local_target(a.rows, p, n);
  const float* s = student_row<TS>(a.rows, n, sc.sf);
  const RowNorm nm = row_norm(a, L, n);
  const double inv_G = a.row_in[(2 + 2 * L) * N + n];
  const double A = a.row_in[(3 + 2 * L) * N + n];
  const double w = a.rows.grad_scale;
  const float lam_e = p.expert_weight, lam_g = p.gate_weight;
  exp_scaled_sum(s, sc.es, C, nm.lse_s, 1.0f);  // σ
  float* g = std::is_same<TS, float>::value ? static_cast<float*>(sc.out) : sc.g;
  const float sigma_coeff = lam_e != 0.0f ? static_cast<float>(w * lam_e * A) : 0.0f;
#pragma omp simd
  for (int64_t j = 0; j < C; ++j) g[j] = sigma_coeff * sc.es[j];
  const double sigma_y = y >= 0 ? sc.es[y] : 0.0;
  double target_expert = sigma_y * A - 1.0, target_gate = 0.0;
  for (int l = 0; l < L; ++l) {
    float* et = sc.et;
    Teacher::load_exp(a.rows, l, n, p.inv_tau[l], et, C, &nm.lse_t[l]);  // π_ℓ
    const double R = a.row_in[(4 + 2 * L + l) * N + n];
    const float x_scale = static_cast<float>(p.expm1_beta[l]);
    const float lam_e_x_scale = static_cast<float>(lam_e * p.expm1_beta[l]);
    const float gate_tau = lam_g * p.tau[l];
    const float inv_tau = p.inv_tau[l];
    const float log_Zq = nm.log_z_q[l];
    // r_ℓj (λ_e x/D − λ_g τ) = r_coeff · class_terms(...).grad_factor; λ_g τ R q_j = q_coeff · e^(log q_j)
    const float r_coeff = static_cast<float>(w * p.level_weight[l] * inv_G);
    const float q_coeff = static_cast<float>(w * lam_g * p.tau[l] * R);
#pragma omp simd
    for (int64_t j = 0; j < C; ++j) {
      const ClassTerms t = class_terms(et[j], sc.es[j], x_scale, lam_e_x_scale, gate_tau);
      const float q = fast_exp_nonpos(mul_add(s[j] - nm.max_s, inv_tau, -log_Zq));
      g[j] = mul_add(r_coeff, t.grad_factor, mul_add(q_coeff, q, g[j]));
    }
    if (y >= 0) {
      const double x = p.expm1_beta[l] * sigma_y;
      const double D = 1.0 + x;
      const double r_y = p.level_weight[l] * inv_G * p.exp_beta[l] * static_cast<double>(et[y]) / D;
      const double q_y = std::exp((static_cast<double>(s[y]) - nm.max_s) * inv_tau - log_Zq);
      target_expert += r_y * x / D;
      target_gate += p.tau[l] * (R * q_y - r_y);
    }
  }
  if (y >= 0)
    g[y] = static_cast<float>(w * ((lam_e != 0.0f ? lam_e * target_expert : 0.0) +
                                   (lam_g != 0.0f ? lam_g * target_gate : 0.0)));
  Scratch out;
  out.out = sc.out;
  store_gradient(grad_row, g, C, out);
}

template <typename TS, typename Teacher>
void run_phase(Phase phase, const PhaseArgs& a, const Params& p, int num_threads) {
  const int64_t N = a.rows.num_rows, C = a.rows.num_classes;
  if (N <= 0 || C <= 0) return;
  const int64_t stride = (C + 15) & ~int64_t{15};
  constexpr int64_t kRows = 5;  // es, et, sf, g, out
  int threads = num_threads > 0 ? num_threads : omp_get_max_threads();
  threads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(threads, N)));
  const int64_t per_thread = stride * kRows;
  std::unique_ptr<float[]> storage(new float[per_thread * threads + 16]);
  float* base = storage.get();
  base += (16 - (reinterpret_cast<uintptr_t>(base) / sizeof(float)) % 16) % 16;
  const int64_t chunk = std::max<int64_t>(1, 4096 / C);
#pragma omp parallel num_threads(threads)
  {
    float* mine = base + per_thread * omp_get_thread_num();
    const PhaseScratch sc{mine, mine + stride, mine + 2 * stride, mine + 3 * stride, mine + 4 * stride};
#pragma omp for schedule(dynamic, chunk)
    for (int64_t n = 0; n < N; ++n) {
      switch (phase) {
        case Phase::kMaxima: maxima_row<TS, Teacher>(a, p, n, sc); break;
        case Phase::kSumsOfExp: sums_of_exp_row<TS, Teacher>(a, p, n, sc); break;
        case Phase::kEstep: estep_row<TS, Teacher>(a, p, n, sc); break;
        case Phase::kGradient: gradient_row<TS, Teacher>(a, p, n, sc); break;
      }
    }
  }
}

template <typename TS>
void dispatch_phase_teacher(Phase phase, const PhaseArgs& a, const Params& p, int num_threads) {
  if (a.rows.teacher == nullptr) {
    switch (a.rows.topk_values_dtype) {
      case DType::kFloat32: return run_phase<TS, TopKTeacher<float>>(phase, a, p, num_threads);
      case DType::kBFloat16: return run_phase<TS, TopKTeacher<BF16>>(phase, a, p, num_threads);
      case DType::kFloat16: return run_phase<TS, TopKTeacher<F16>>(phase, a, p, num_threads);
      case DType::kFloat64: return run_phase<TS, TopKTeacher<double>>(phase, a, p, num_threads);
    }
    return;
  }
  switch (a.rows.teacher_dtype) {
    case DType::kFloat32: return run_phase<TS, DenseTeacher<float>>(phase, a, p, num_threads);
    case DType::kBFloat16: return run_phase<TS, DenseTeacher<BF16>>(phase, a, p, num_threads);
    case DType::kFloat16: return run_phase<TS, DenseTeacher<F16>>(phase, a, p, num_threads);
    case DType::kFloat64: return run_phase<TS, DenseTeacher<double>>(phase, a, p, num_threads);
  }
}

}  // namespace

void moe_kd_phase(Phase phase, const PhaseArgs& a, const Params& p, int num_threads) {
  switch (a.rows.student_dtype) {
    case DType::kFloat32: return dispatch_phase_teacher<float>(phase, a, p, num_threads);
    case DType::kBFloat16: return dispatch_phase_teacher<BF16>(phase, a, p, num_threads);
    case DType::kFloat16: return dispatch_phase_teacher<F16>(phase, a, p, num_threads);
    case DType::kFloat64: return;  // not a student dtype: the binding refuses it
  }
}

void moe_kd_rows(const RowsArgs& a, const Params& p, int num_threads) {
  switch (a.student_dtype) {
    case DType::kFloat32: return dispatch_teacher<float>(a, p, num_threads);
    case DType::kBFloat16: return dispatch_teacher<BF16>(a, p, num_threads);
    case DType::kFloat16: return dispatch_teacher<F16>(a, p, num_threads);
    case DType::kFloat64: return;  // not a student dtype: the binding refuses it
  }
}

float exp_for_test(float x) { return fast_exp_nonpos(x); }
float log_for_test(float x) { return fast_log_ge1(x); }

}  // namespace cpu
}  // namespace moekd
