// Fused MoE-KD rows on the CPU (see moekd_cpu.h and csrc/common/moekd_math.h).
//
// Cost model: on a CPU this loss is bound by exp, not by memory, so every exp
// is taken exactly once per element and kept. Each thread owns a scratch block
// of (1 + 2L) float rows and walks its rows one at a time, so a row's data
// stays in L1/L2 across the passes:
//   1. max of s and of every t_ℓ/τ_ℓ (one read of the inputs), then
//      es = exp(s − max s), eq_ℓ = exp((s − max s)/τ_ℓ), et_ℓ = exp(t_ℓ/τ_ℓ − max)
//      and their sums: the only exps of the whole row, 1 + 2L per class.
//   2. per level, the RowSums of moekd_math.h from es, et_ℓ and s; et_ℓ is
//      overwritten with u_ℓ, the unnormalised responsibilities.
//   3. the gradient from es, eq_ℓ and u_ℓ: no exp, one division per level.
// exp and log are polynomial versions that GCC vectorises under `omp simd`;
// both are within ~2 ulp of libm and keep the IEEE special cases (exp(−inf) = 0,
// NaN in → NaN out), which is why the build avoids -ffast-math.
// Sums over classes run in float within blocks of kSumBlock classes and in
// double across blocks, so C = 131072 loses no accuracy to long float sums.
#include "cpu/moekd_cpu.h"

#include <omp.h>

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

// e^x = 2^k · e^r with k = round(x log2 e), |r| <= ln2/2, and a degree-6 fit of e^r
// (relative error 2e-9 on that interval, far below float rounding).
// Adding 1.5·2^23 rounds to an integer without a float→int conversion, which
// would be undefined for NaN/inf; those lanes are fixed by the selects at the end.
// Results below 2^-126 flush to 0 (they only ever enter sums dominated by 1),
// and x > 127.5 ln 2 gives +inf (never reached: arguments are max-subtracted).
MOEKD_INLINE float fast_exp(float x) {
  constexpr float kLog2e = 1.44269504088896341f;
  constexpr float kShift = 12582912.0f;
  constexpr float kMinArg = -87.3365479f;  // ln 2^-126
  constexpr float kMaxArg = 88.3762626f;   // 127.5 ln 2, so k <= 127
  const float shifted = mul_add(x, kLog2e, kShift);
  const float k = shifted - kShift;
  float r = x - k * kLn2Hi;
  r = r - k * kLn2Lo;
  float p = 1.3829420786350965e-3f;
  p = mul_add(p, r, 8.374771103262901e-3f);
  p = mul_add(p, r, 4.16683591902256e-2f);
  p = mul_add(p, r, 1.666642129421234e-1f);
  p = mul_add(p, r, 4.9999991059303284e-1f);
  p = mul_add(p, r, 1.0f);
  p = mul_add(p, r, 1.0f);
  const float scale = float_of((bits_of(shifted) - bits_of(kShift) + 127u) << 23);  // 2^k
  float y = p * scale;
  y = x < kMinArg ? 0.0f : y;  // also exp(−inf) = 0
  y = x > kMaxArg ? kInf : y;
  return y;  // NaN fails both comparisons and stays NaN
}

// ln x for x >= 1 (the expert normalisers D). x = 2^e · (1 + f) with 1 + f in
// [√½, √2); ln(1 + f) = f − ½f² + s(½f² + R(s²)), s = f/(2 + f), |s| <= 0.172,
// R the odd atanh series to s^11: the small correction keeps it within ~1 ulp.
// +inf and NaN pass through.
MOEKD_INLINE float fast_log_ge1(float x) {
  const uint32_t b = bits_of(x);
  int32_t e = static_cast<int32_t>(b >> 23) - 127;
  float m = float_of((b & 0x007fffffu) | 0x3f800000u);
  const bool high = m > 1.41421356f;
  m = high ? 0.5f * m : m;
  e = high ? e + 1 : e;
  const float f = m - 1.0f;  // exact (Sterbenz)
  const float s = f / (2.0f + f);
  const float z = s * s;
  float R = 2.0f / 11.0f;
  R = mul_add(R, z, 2.0f / 9.0f);
  R = mul_add(R, z, 2.0f / 7.0f);
  R = mul_add(R, z, 2.0f / 5.0f);
  R = mul_add(R, z, 2.0f / 3.0f);
  R *= z;
  const float half_f2 = 0.5f * f * f;
  const float ef = static_cast<float>(e);
  const float log_m = f - (half_f2 - s * (half_f2 + R));
  const float y = ef * kLn2Hi + (mul_add(ef, kLn2Lo, log_m));
  return x < kInf ? y : x;
}

// log1p(x) for x >= 0 given D = 1 + x (rounded) and 1/D: ln D plus the
// first-order correction for the rounding of 1 + x, as accurate as log1p.
MOEKD_INLINE float log1p_from(float x, float D, float inv_D) {
  return fast_log_ge1(D) + (x - (D - 1.0f)) * inv_D;
}

// ---- element types ---------------------------------------------------------------

struct BF16 {
  uint16_t bits;
};
struct F16 {
  uint16_t bits;
};

MOEKD_INLINE float to_float(float x) { return x; }
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
  float* es;                 // exp(s − max s), then nothing
  float* eq[kMaxLevels];     // exp((s − max s)/τ_ℓ)
  float* et[kMaxLevels];     // t_ℓ/τ_ℓ → exp(t_ℓ/τ_ℓ − max) → u_ℓ
  float* sf;                 // s as float (low-precision students), later the float gradient
};

// et[c] = exp(et[c] − shift); returns Σ_c et[c].
MOEKD_INLINE double exp_in_place_sum(float* et, int64_t C, float shift) {
  double total = 0.0;
  for (int64_t b0 = 0; b0 < C; b0 += kSumBlock) {
    const int64_t b1 = std::min(C, b0 + kSumBlock);
    float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
    for (int64_t c = b0; c < b1; ++c) {
      const float e = fast_exp(et[c] - shift);
      et[c] = e;
      acc += e;
    }
    total += acc;
  }
  return total;
}

// out[c] = exp((s[c] − s_max) · scale); returns Σ_c out[c].
MOEKD_INLINE double exp_scaled_sum(const float* s, float* out, int64_t C, float s_max,
                                   float scale) {
  double total = 0.0;
  for (int64_t b0 = 0; b0 < C; b0 += kSumBlock) {
    const int64_t b1 = std::min(C, b0 + kSumBlock);
    float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
    for (int64_t c = b0; c < b1; ++c) {
      const float e = fast_exp((s[c] - s_max) * scale);
      out[c] = e;
      acc += e;
    }
    total += acc;
  }
  return total;
}

// Pass-2 terms of one class at one level, u given without the target boost.
struct ClassTerms {
  float u, u_over_D, u_log_D, u_log_q;
};

MOEKD_INLINE ClassTerms class_terms(float u_unnormed_pi, float sigma, float expm1_beta,
                                    float log_q) {
  const float x = expm1_beta * sigma;
  const float D = 1.0f + x;
  const float inv_D = 1.0f / D;
  const float u = u_unnormed_pi * inv_D;
  ClassTerms t;
  t.u = u;
  t.u_over_D = u * inv_D;
  t.u_log_D = u * log1p_from(x, D, inv_D);
  t.u_log_q = u == 0.0f ? 0.0f : u * log_q;  // 0 · log 0 = 0 for classes masked in both
  return t;
}

template <typename TS, typename TT>
void process_row(const RowsArgs& a, const Params& p, int64_t n, const Scratch& sc) {
  const int64_t C = a.num_classes;
  const int L = p.num_levels;
  TS* grad_row = static_cast<TS*>(a.grad) + n * C;
  const int64_t y = a.target[n];
  if (y == p.ignore_index) {
    a.loss[n] = a.log_likelihood[n] = a.agreement[n] = 0.0f;
    std::memset(static_cast<void*>(grad_row), 0, sizeof(TS) * C);
    return;
  }
  if (y < 0 || y >= C) {
    a.loss[n] = a.log_likelihood[n] = a.agreement[n] = kNaN;
    fill_row(grad_row, C, kNaN);
    return;
  }

  // ---- pass 1: maxima, then every exp of the row ----
  const TS* s_in = static_cast<const TS*>(a.student) + n * a.student_row_stride;
  const float* s;
  float s_max = -kInf;
  if (std::is_same<TS, float>::value) {
    s = reinterpret_cast<const float*>(s_in);
#pragma omp simd reduction(max : s_max)
    for (int64_t c = 0; c < C; ++c) s_max = std::max(s_max, s[c]);
  } else {
    float* sf = sc.sf;
#pragma omp simd reduction(max : s_max)
    for (int64_t c = 0; c < C; ++c) {
      const float v = to_float(s_in[c]);
      sf[c] = v;
      s_max = std::max(s_max, v);
    }
    s = sf;
  }
  // A NaN logit is skipped by max but reaches the sums through exp: NaN still propagates.

  double Zt[kMaxLevels], Zq[kMaxLevels];
  for (int l = 0; l < L; ++l) {
    const TT* t_in = static_cast<const TT*>(a.teacher) + l * a.teacher_level_stride +
                     n * a.teacher_row_stride;
    float* et = sc.et[l];
    const float inv_tau = p.inv_tau[l];
    float t_max = -kInf;
#pragma omp simd reduction(max : t_max)
    for (int64_t c = 0; c < C; ++c) {
      const float v = to_float(t_in[c]) * inv_tau;
      et[c] = v;
      t_max = std::max(t_max, v);
    }
    Zt[l] = exp_in_place_sum(et, C, t_max);
  }
  const double Zs = exp_scaled_sum(s, sc.es, C, s_max, 1.0f);
  for (int l = 0; l < L; ++l) Zq[l] = exp_scaled_sum(s, sc.eq[l], C, s_max, p.inv_tau[l]);

  const float inv_Zs = static_cast<float>(1.0 / Zs);
  const float log_sigma_y = (s[y] - s_max) - static_cast<float>(std::log(Zs));

  // ---- pass 2: RowSums, level by level; et_ℓ becomes u_ℓ ----
  RowSums sums;
  row_sums_clear(sums, L);
  double u_total = 0.0, u_over_D = 0.0, u_log_D = 0.0;
  for (int l = 0; l < L; ++l) {
    float* et = sc.et[l];
    const float* es = sc.es;
    const float k = p.expm1_beta[l];
    const float weight = static_cast<float>(p.level_weight[l] / Zt[l]);  // w_ℓ π_ℓc = weight · et
    const float inv_tau = p.inv_tau[l];
    const float log_Zq = static_cast<float>(std::log(Zq[l]));
    double sum_u = 0.0, sum_u_over_D = 0.0, sum_u_log_D = 0.0, sum_u_log_q = 0.0;
    for (int64_t b0 = 0; b0 < C; b0 += kSumBlock) {
      const int64_t b1 = std::min(C, b0 + kSumBlock);
      float acc_u = 0.0f, acc_uD = 0.0f, acc_ulogD = 0.0f, acc_ulogq = 0.0f;
#pragma omp simd reduction(+ : acc_u, acc_uD, acc_ulogD, acc_ulogq)
      for (int64_t c = b0; c < b1; ++c) {
        const float log_q = (s[c] - s_max) * inv_tau - log_Zq;
        const ClassTerms t = class_terms(weight * et[c], es[c] * inv_Zs, k, log_q);
        et[c] = t.u;
        acc_u += t.u;
        acc_uD += t.u_over_D;
        acc_ulogD += t.u_log_D;
        acc_ulogq += t.u_log_q;
      }
      sum_u += acc_u;
      sum_u_over_D += acc_uD;
      sum_u_log_D += acc_ulogD;
      sum_u_log_q += acc_ulogq;
    }
    // The target's boost exp(β): add expm1(β) times its unboosted terms (no cancellation).
    // et[y] now holds the unboosted u_y.
    const float log_q_y = (s[y] - s_max) * inv_tau - log_Zq;
    const float u_y = et[y];
    const float x_y = k * (es[y] * inv_Zs);
    const float D_y = 1.0f + x_y;
    const float inv_D_y = 1.0f / D_y;
    const float extra = p.expm1_beta[l] * u_y;
    sum_u += extra;
    sum_u_over_D += extra * inv_D_y;
    sum_u_log_D += extra * log1p_from(x_y, D_y, inv_D_y);
    if (extra != 0.0f) sum_u_log_q += extra * log_q_y;
    et[y] = u_y * p.exp_beta[l];

    u_total += sum_u;
    u_over_D += sum_u_over_D;
    u_log_D += sum_u_log_D;
    sums.u_level[l] = static_cast<float>(sum_u);
    sums.u_log_q[l] = static_cast<float>(sum_u_log_q);
    sums.u_target[l] = et[y];
  }
  sums.u_total = static_cast<float>(u_total);
  sums.u_over_D = static_cast<float>(u_over_D);
  sums.u_log_D = static_cast<float>(u_log_D);
  const RowResult row = finalize_row(sums, p, log_sigma_y);
  a.loss[n] = row.loss;
  a.log_likelihood[n] = row.log_likelihood;
  a.agreement[n] = row.agreement;

  // ---- pass 3: the gradient ----
  //   g_j = λ_e σ_j A − λ_e [j = y]
  //       + Σ_ℓ r_ℓj (λ_e x_ℓj / D_ℓj − λ_g τ_ℓ) + λ_g τ_ℓ R_ℓ q_ℓj,   x = expm1(β) σ
  float* g = std::is_same<TS, float>::value ? reinterpret_cast<float*>(grad_row) : sc.sf;
  const float lam_e = p.expert_weight;
  const float base = lam_e * row.A;
  const float inv_G = row.inv_G;
  for (int l = 0; l < L; ++l) {
    const float* es = sc.es;
    const float* u = sc.et[l];
    const float* eq = sc.eq[l];
    const float k = p.expm1_beta[l];
    const float gate_tau = p.gate_weight * p.tau[l];
    const float q_coeff = static_cast<float>(gate_tau * row.R[l] / Zq[l]);
    const bool first = l == 0;
#pragma omp simd
    for (int64_t j = 0; j < C; ++j) {
      const float sigma = es[j] * inv_Zs;
      const float x = k * sigma;
      const float r = u[j] * inv_G;
      const float term = r * (lam_e * x / (1.0f + x) - gate_tau) + q_coeff * eq[j];
      g[j] = first ? mul_add(base, sigma, term) : g[j] + term;
    }
  }
  g[y] -= lam_e;
  if (!std::is_same<TS, float>::value) {
#pragma omp simd
    for (int64_t j = 0; j < C; ++j) store(grad_row + j, g[j]);
  }
}

template <typename TS, typename TT>
void run(const RowsArgs& a, const Params& p, int num_threads) {
  const int64_t N = a.num_rows, C = a.num_classes;
  if (N <= 0 || C <= 0) return;
  const int L = p.num_levels;
  const int64_t stride = (C + 15) & ~int64_t{15};  // 64-byte aligned rows
  const int64_t rows_per_thread = 2 + 2 * static_cast<int64_t>(L);
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
#pragma omp for schedule(dynamic, chunk)
    for (int64_t n = 0; n < N; ++n) process_row<TS, TT>(a, p, n, sc);
  }
}

template <typename TS>
void dispatch_teacher(const RowsArgs& a, const Params& p, int num_threads) {
  switch (a.teacher_dtype) {
    case DType::kFloat32: return run<TS, float>(a, p, num_threads);
    case DType::kBFloat16: return run<TS, BF16>(a, p, num_threads);
    case DType::kFloat16: return run<TS, F16>(a, p, num_threads);
  }
}

}  // namespace

void moe_kd_rows(const RowsArgs& a, const Params& p, int num_threads) {
  switch (a.student_dtype) {
    case DType::kFloat32: return dispatch_teacher<float>(a, p, num_threads);
    case DType::kBFloat16: return dispatch_teacher<BF16>(a, p, num_threads);
    case DType::kFloat16: return dispatch_teacher<F16>(a, p, num_threads);
  }
}

float exp_for_test(float x) { return fast_exp(x); }
float log_for_test(float x) { return fast_log_ge1(x); }

}  // namespace cpu
}  // namespace moekd
