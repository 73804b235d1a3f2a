// The per-thread work of the CUDA kernel, written so that a host compiler takes it too.
//
// A row is processed by a "group" of G threads (a warp, a thread block, or the
// thread blocks of a cluster). The functions here are what ONE thread does between
// two group-wide reductions; the kernel (moekd_cuda.cuh) supplies the reductions
// and barriers. Being host-callable, the exact indexing and per-element math run
// on the CPU in tests/test_cuda_backend.py (through host_emulation.cpp): the only
// check the kernel gets on a machine without a GPU.
//
// Flow of a row (L levels; every loop over levels runs to L at run time):
//   pass 1, per level ℓ: max and Σ exp of s, s/τ_ℓ and t_ℓ/τ_ℓ → reduce → publish
//   pass 2, per level ℓ: the u-weighted sums of moekd::RowSums  → reduce → publish
//   finalize_row (moekd_math.h) on the published sums → loss, stats, R_ℓ
//   pass 3: the gradient, all levels per element.
// Per-level reductions keep the reduced state at 5 floats whatever L is, and
// the published constants live in shared memory (LevelConsts), indexed by ℓ.
//
// Row layout. Each row is split into a scalar head, whole chunks of 8 elements
// read with 16-byte vector loads, and a scalar tail. The head length is chosen so
// that the student row, every teacher level and the gradient row are all 16-byte
// aligned at the first chunk; when no head length does that (say, a bf16 student
// with an fp32 teacher at unrelated offsets), the whole row is scalar. Thread gi
// takes chunks gi, gi + G, ...; its j-th chunk may be kept in a per-thread cache
// slot (shared memory on the GPU), so later reads skip global memory. The cache is
// filled either by pass 1's reads or, before pass 1, by prefetch_row (asynchronous
// copies on the GPU). Only the thread that filled a slot reads it: the cache needs
// no barrier.
//
// Math. Exponentials are base 2 (exp2(x·log2e) = exp(x)): the GPU's exp2 is one
// special-function instruction, and log2e is folded into k2 = log2(e)/τ_ℓ.
// pass2_classes fills moekd::RowSums and pass3_level adds the per-level gradient terms,
// with 1/D formed once (a 2-ulp reciprocal) and log D as log2(D)·ln2. log D only
// enters the loss through Σ r log D with Σ r = 1, so its absolute error (< 2e-7)
// is the loss's.
#pragma once

#include <math.h>
#include <stdint.h>
#include <string.h>

#include "common/moekd_math.h"

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#endif

namespace moekd {
namespace cuda_row {

constexpr float kLog2e = 1.44269504088896340736f;
constexpr float kLn2 = 0.69314718055994530942f;
constexpr int kChunk = 8;  // elements per chunk: one 16-byte vector of bf16/fp16, two of fp32

struct alignas(16) Vec16 {
  uint32_t w[4];
};

// Storage types of the 16-bit inputs: raw bits, converted explicitly (torch's JIT
// flags turn off the implicit conversions of cuda_bf16.h / cuda_fp16.h).
struct bf16_t {
  uint16_t bits;
};
struct fp16_t {
  uint16_t bits;
};

// ---- scalar helpers ----------------------------------------------------------

MOEKD_HD float bits_to_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  memcpy(&f, &u, sizeof f);
  return f;
#endif
}

MOEKD_HD uint32_t float_to_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  memcpy(&u, &f, sizeof u);
  return u;
#endif
}

// 1/D for D in [1, exp(50)]: one reciprocal instruction on the GPU (2 ulp).
MOEKD_HD float fast_rcp(float x) {
#if defined(__CUDA_ARCH__)
  return __fdividef(1.0f, x);
#else
  return 1.0f / x;
#endif
}

// log2 for D >= 1; absolute error below 2^-22 near 1, 2 ulp above 2.
MOEKD_HD float fast_log2(float x) {
#if defined(__CUDA_ARCH__)
  return __log2f(x);
#else
  return log2f(x);
#endif
}

// ---- element types -------------------------------------------------------------

// Elem<T>: how a chunk of 8 elements sits in kVecs 16-byte vectors, and scalar conversions.
template <class T>
struct Elem;

template <>
struct Elem<float> {
  static constexpr int kVecs = 2;
  MOEKD_HD static float to_float(float x) { return x; }
  MOEKD_HD static float from_float(float x) { return x; }
  MOEKD_HD static void unpack(const Vec16 (&v)[kVecs], float (&x)[kChunk]) {
    MOEKD_UNROLL
    for (int i = 0; i < kChunk; ++i) x[i] = bits_to_float(v[i / 4].w[i % 4]);
  }
  MOEKD_HD static void pack(const float (&x)[kChunk], Vec16 (&v)[kVecs]) {
    MOEKD_UNROLL
    for (int i = 0; i < kChunk; ++i) v[i / 4].w[i % 4] = float_to_bits(x[i]);
  }
};

// Two 16-bit elements per 32-bit word, element 2i in the low half (little-endian memory order).
template <class T>
struct Elem16 {
  static constexpr int kVecs = 1;
  MOEKD_HD static void unpack(const Vec16 (&v)[kVecs], float (&x)[kChunk]) {
    MOEKD_UNROLL
    for (int i = 0; i < kChunk / 2; ++i) {
      x[2 * i] = Elem<T>::bits_to_f32(static_cast<uint16_t>(v[0].w[i] & 0xffffu));
      x[2 * i + 1] = Elem<T>::bits_to_f32(static_cast<uint16_t>(v[0].w[i] >> 16));
    }
  }
  MOEKD_HD static void pack(const float (&x)[kChunk], Vec16 (&v)[kVecs]) {
    MOEKD_UNROLL
    for (int i = 0; i < kChunk / 2; ++i)
      v[0].w[i] = static_cast<uint32_t>(Elem<T>::f32_to_bits(x[2 * i])) |
                  (static_cast<uint32_t>(Elem<T>::f32_to_bits(x[2 * i + 1])) << 16);
  }
};

template <>
struct Elem<bf16_t> : Elem16<bf16_t> {
  // bf16 is the top half of a float32: widening is a shift, exact.
  MOEKD_HD static float bits_to_f32(uint16_t b) { return bits_to_float(static_cast<uint32_t>(b) << 16); }
  // Round to nearest even; NaN stays NaN.
  MOEKD_HD static uint16_t f32_to_bits(float f) {
#if defined(__CUDACC__)
    return __bfloat16_as_ushort(__float2bfloat16_rn(f));
#else
    const uint32_t u = float_to_bits(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40u);
    return static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
#endif
  }
  MOEKD_HD static float to_float(bf16_t x) { return bits_to_f32(x.bits); }
  MOEKD_HD static bf16_t from_float(float f) { return bf16_t{f32_to_bits(f)}; }
};

template <>
struct Elem<fp16_t> : Elem16<fp16_t> {
  MOEKD_HD static float bits_to_f32(uint16_t b) {
#if defined(__CUDACC__)
    return __half2float(__ushort_as_half(b));
#else
    _Float16 h;  // GCC/Clang on x86-64 and AArch64: IEEE binary16 with exact widening
    memcpy(&h, &b, sizeof h);
    return static_cast<float>(h);
#endif
  }
  MOEKD_HD static uint16_t f32_to_bits(float f) {
#if defined(__CUDACC__)
    return __half_as_ushort(__float2half_rn(f));
#else
    const _Float16 h = static_cast<_Float16>(f);
    uint16_t b;
    memcpy(&b, &h, sizeof b);
    return b;
#endif
  }
  MOEKD_HD static float to_float(fp16_t x) { return bits_to_f32(x.bits); }
  MOEKD_HD static fp16_t from_float(float f) { return fp16_t{f32_to_bits(f)}; }
};

// ---- constants -------------------------------------------------------------------

// moekd::Params plus the base-2 scales; levels >= num_levels are zero.
struct KernelConsts {
  Params p;
  float k2[kMaxLevels];  // log2(e) / τ_ℓ: exp(x / τ) = exp2(x · k2)
};

inline KernelConsts make_kernel_consts(const Params& params) {
  KernelConsts k;
  k.p = params;
  for (int l = 0; l < kMaxLevels; ++l) {
    if (l < params.num_levels) {
      k.k2[l] = static_cast<float>(1.4426950408889634 * static_cast<double>(params.inv_tau[l]));
    } else {
      // Zero: any loop that runs to kMaxLevels adds nothing for an unused level.
      k.p.tau[l] = k.p.inv_tau[l] = k.p.beta[l] = k.p.exp_beta[l] = 0.0f;
      k.p.expm1_beta[l] = k.p.level_weight[l] = 0.0f;
      k.k2[l] = 0.0f;
    }
  }
  return k;
}

// Everything passes 2 and 3 need about one level, in one place: shared memory on
// the GPU (one copy per row group), written by the group's leader thread and read
// by all after a barrier. Loops over levels run to L at run time and index this
// array; register arrays indexed that way would go to local memory.
struct alignas(16) LevelConsts {
  // from the options (leader_init_levels)
  float k2, inv_tau, weight, exp_beta, expm1_beta, gate_tau;  // gate_tau = λ_g τ_ℓ
  // from pass 1 (publish_pass1):  π = exp2((t − t_max)·k2 − t_lse2),
  //   log q = (s − s_max)/τ − q_lse,  q = exp2((s − s_max)·k2 − q_lse2)
  float t_max, t_lse2, q_lse, q_lse2;
  // from pass 2 (publish_pass2, publish_R)
  float u_level, u_log_q, u_target, R;
  float pad[2];
};

// Row-wide constants; every thread of the group holds the same values.
struct RowConsts {
  float s_max;        // max_c s_c; σ_c = exp2((s_c − s_max)·log2e − s_lse2)
  float s_lse, s_lse2;
  float log_sigma_y;  // log σ_y = (s_y − s_max) − s_lse
  // pass-2 sums over all levels (the per-level ones are in LevelConsts)
  float u_rest, u_over_D, u_log_D_rest;
};

MOEKD_HD void leader_init_levels(LevelConsts* lc, const KernelConsts& kc) {
  MOEKD_UNROLL
  for (int l = 0; l < kMaxLevels; ++l) {  // constant indices into kc: no local copy of it
    if (l >= kc.p.num_levels) break;
    lc[l].k2 = kc.k2[l];
    lc[l].inv_tau = kc.p.inv_tau[l];
    lc[l].weight = kc.p.level_weight[l];
    lc[l].exp_beta = kc.p.exp_beta[l];
    lc[l].expm1_beta = kc.p.expm1_beta[l];
    lc[l].gate_tau = kc.p.gate_weight * kc.p.tau[l];
  }
}

// ---- pass 1: per-level online log-sum-exp ----------------------------------------------

// One thread's (or, merged, the row's) pass-1 sums for level ℓ, each relative to a max:
//   s_sum = Σ exp(s − s_max)          (σ; level 0 only, 0 at other levels)
//   q_sum = Σ exp((s − s_max)/τ_ℓ)    (max(s/τ) = max(s)/τ: the student max serves all levels)
//   t_sum = Σ exp((t_ℓ − t_max)/τ_ℓ)
struct Pass1Level {
  float s_max, s_sum, q_sum, t_max, t_sum;
};

MOEKD_HD Pass1Level pass1_identity() { return {-INFINITY, 0.0f, 0.0f, -INFINITY, 0.0f}; }

// Factor taking a sum relative to max m to one relative to M >= m. m == M covers
// (−inf, −inf), which would otherwise give exp2(NaN); m = −inf < M gives 0.
MOEKD_HD float rescale(float m, float M, float k) { return m == M ? 1.0f : exp2f((m - M) * k); }

// a ← a ⊕ b, with k2 = log2(e)/τ_ℓ. Symmetric to the bit, so a butterfly leaves all lanes equal.
MOEKD_HD void pass1_merge(Pass1Level& a, const Pass1Level& b, float k2) {
  const float M = fmaxf(a.s_max, b.s_max);
  a.s_sum = a.s_sum * rescale(a.s_max, M, kLog2e) + b.s_sum * rescale(b.s_max, M, kLog2e);
  a.q_sum = a.q_sum * rescale(a.s_max, M, k2) + b.q_sum * rescale(b.s_max, M, k2);
  a.s_max = M;
  const float Mt = fmaxf(a.t_max, b.t_max);
  a.t_sum = a.t_sum * rescale(a.t_max, Mt, k2) + b.t_sum * rescale(b.t_max, Mt, k2);
  a.t_max = Mt;
}

// Adds W values to a running max and NS sums at scales k[n]. The max ignores NaN
// (fmaxf) but a NaN value still makes the sums NaN. While the max is −inf (only
// −inf/NaN seen), terms are taken relative to 0, so −inf adds exp2(−inf) = 0.
template <int W, int NS>
MOEKD_HD void online_add(float& max, float (&sum)[NS], const float (&k)[NS], const float (&x)[W]) {
  float m = max;
  MOEKD_UNROLL
  for (int i = 0; i < W; ++i) m = fmaxf(m, x[i]);
  if (m != max) {
    const float dm = max - m;  // −inf when the old max was −inf: the old sums (0) stay 0
    MOEKD_UNROLL
    for (int n = 0; n < NS; ++n) sum[n] *= exp2f(dm * k[n]);
    max = m;
  }
  const float ref = m == -INFINITY ? 0.0f : m;
  MOEKD_UNROLL
  for (int i = 0; i < W; ++i) {
    const float d = x[i] - ref;
    MOEKD_UNROLL
    for (int n = 0; n < NS; ++n) sum[n] += exp2f(d * k[n]);
  }
}

// Sums relative to a max fixed in advance (the thread's own student max, levels > 0).
template <int W>
MOEKD_HD void fixed_add(float max, float& sum, float k, const float (&x)[W]) {
  const float ref = max == -INFINITY ? 0.0f : max;
  MOEKD_UNROLL
  for (int i = 0; i < W; ++i) sum += exp2f((x[i] - ref) * k);
}

// ---- one row, as seen by one thread ----------------------------------------------

template <class TS, class TT>
struct RowCtx {
  const TS* s;                // student row
  const TT* t;                // teacher row at level 0
  long long t_level_stride;   // elements from one level's row to the next
  TS* g;                      // gradient row
  int C, L, y;                // classes, levels, target (0 <= y < C for rows that reach the passes)
  int head, nchunks, nscalar; // layout: [0, head) scalar, then nchunks chunks, then the tail
  int gi, G;                  // this thread's index in the row's group, the group's size
  Vec16* cache;               // this thread's CTA's cache, or nullptr: read global memory again
  int cache_tid, cache_width; // index and count of the threads sharing that cache
  int cache_slots;            // chunks per thread the cache holds (>= ceil(nchunks / G))
  bool prefetched;            // prefetch_row filled the cache: pass 1 reads it, not global memory
  LevelConsts* lc;            // the group's level constants (shared memory on the GPU)

  MOEKD_HD const TT* level(int l) const { return t + l * t_level_stride; }
  // Class of scalar item e in [0, nscalar): the head, then the tail after the chunks.
  MOEKD_HD int scalar_class(int e) const { return e < head ? e : e + kChunk * nchunks; }
  // Cache slot of this thread's j-th chunk of tensor `which` (0: student, 1 + ℓ: teacher
  // level ℓ), vector v of the chunk. Consecutive threads use consecutive 16-byte slots.
  MOEKD_HD Vec16* slot(int which, int j, int v) const {
    constexpr int VS = Elem<TS>::kVecs, VT = Elem<TT>::kVecs;
    const long long plane = static_cast<long long>(cache_slots) * cache_width;
    const long long base = which == 0 ? 0 : plane * (VS + (which - 1) * VT);
    const int vecs = which == 0 ? VS : VT;
    return cache + base + (static_cast<long long>(j) * vecs + v) * cache_width + cache_tid;
  }
};

// The gradient's base address when there is none (need_grad = 0), never dereferenced.
// plan_layout aligns a row's chunks for its gradient row too; every PyTorch allocation
// is at least 256-byte aligned, like this address, so the row layout, the order of the
// sums and their bits are those of a call with a gradient.
inline void* no_grad_base() { return reinterpret_cast<void*>(uintptr_t{256}); }

template <class T>
MOEKD_HD bool aligned16(const T* p) {
  return (reinterpret_cast<uintptr_t>(p) & 15u) == 0;
}

// Picks head so that every row pointer is 16-byte aligned at class head; all
// scalar (nchunks = 0) when none of the 8 candidates works or C < head + 8.
template <class TS, class TT>
MOEKD_HD void plan_layout(RowCtx<TS, TT>& r) {
  r.head = 0;
  r.nchunks = 0;
  for (int h = 0; h < kChunk && h + kChunk <= r.C; ++h) {
    bool ok = aligned16(r.s + h) && aligned16(r.g + h);
    for (int l = 0; l < r.L; ++l) ok = ok && aligned16(r.level(l) + h);
    if (ok) {
      r.head = h;
      r.nchunks = (r.C - h) / kChunk;
      break;
    }
  }
  r.nscalar = r.C - kChunk * r.nchunks;
}

// Chunk at class c0 of `row` (tensor `which` for the cache) into x. A first read
// goes to global memory and fills the cache; later reads use the cache if any.
template <class T, class TS, class TT>
MOEKD_HD void load_chunk(const RowCtx<TS, TT>& r, const T* row, int which, int j, int c0, bool first_read,
                         float (&x)[kChunk]) {
  constexpr int V = Elem<T>::kVecs;
  Vec16 v[V];
  if (r.cache != nullptr && !first_read) {
    MOEKD_UNROLL
    for (int i = 0; i < V; ++i) v[i] = *r.slot(which, j, i);
  } else {
    const Vec16* src = reinterpret_cast<const Vec16*>(row + c0);
    MOEKD_UNROLL
    for (int i = 0; i < V; ++i) v[i] = src[i];
    if (r.cache != nullptr) {
      MOEKD_UNROLL
      for (int i = 0; i < V; ++i) *r.slot(which, j, i) = v[i];
    }
  }
  Elem<T>::unpack(v, x);
}

// 16 bytes global → shared memory without a trip through registers (cp.async,
// sm_80+): a thread can have all its chunks in flight at once, instead of waiting
// out the memory latency once per chunk as a load-then-use loop does. .cg keeps
// the lines in L2 only: each is read once. A plain copy on the host.
MOEKD_HD void copy16_async(Vec16* dst, const Vec16* src) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(static_cast<unsigned>(__cvta_generic_to_shared(dst))),
               "l"(__cvta_generic_to_global(src))
               : "memory");
#else
  *dst = *src;
#endif
}

// Waits for this thread's copy16_async calls; their data is then visible to this
// thread (and only this one needs it: no barrier).
MOEKD_HD void copy_async_wait_all() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_all;\n" ::: "memory");
#endif
}

// Fills this thread's cache slots with all its chunks of the student row and of
// every teacher level, and waits for them; pass 1 then reads the cache like passes
// 2 and 3 (r.prefetched). Same slots and order as load_chunk's first reads.
template <class TS, class TT>
MOEKD_HD void prefetch_row(const RowCtx<TS, TT>& r) {
  constexpr int VS = Elem<TS>::kVecs, VT = Elem<TT>::kVecs;
  int j = 0;
  for (int ch = r.gi; ch < r.nchunks; ch += r.G, ++j) {
    const int c0 = r.head + ch * kChunk;
    const Vec16* s = reinterpret_cast<const Vec16*>(r.s + c0);
    MOEKD_UNROLL
    for (int i = 0; i < VS; ++i) copy16_async(r.slot(0, j, i), s + i);
    for (int l = 0; l < r.L; ++l) {
      const Vec16* t = reinterpret_cast<const Vec16*>(r.level(l) + c0);
      MOEKD_UNROLL
      for (int i = 0; i < VT; ++i) copy16_async(r.slot(1 + l, j, i), t + i);
    }
  }
  copy_async_wait_all();
}

// This thread's pass-1 sums for level l. Level 0 also finds the thread's student
// max (s_max_thread, read by later levels) and σ's sum.
template <class TS, class TT>
MOEKD_HD Pass1Level pass1_level(const RowCtx<TS, TT>& r, int l, float& s_max_thread) {
  const float k2 = r.lc[l].k2;
  Pass1Level st = pass1_identity();
  const TT* t = r.level(l);
  int j = 0;
  for (int ch = r.gi; ch < r.nchunks; ch += r.G, ++j) {
    const int c0 = r.head + ch * kChunk;
    float x[kChunk];
    load_chunk(r, r.s, 0, j, c0, l == 0 && !r.prefetched, x);
    if (l == 0) {
      float sums[2] = {st.s_sum, st.q_sum};
      const float k[2] = {kLog2e, k2};
      online_add<kChunk>(st.s_max, sums, k, x);
      st.s_sum = sums[0];
      st.q_sum = sums[1];
    } else {
      fixed_add<kChunk>(s_max_thread, st.q_sum, k2, x);
    }
    load_chunk(r, t, 1 + l, j, c0, !r.prefetched, x);
    float ts[1] = {st.t_sum};
    const float kt[1] = {k2};
    online_add<kChunk>(st.t_max, ts, kt, x);
    st.t_sum = ts[0];
  }
  for (int e = r.gi; e < r.nscalar; e += r.G) {
    const int c = r.scalar_class(e);
    const float x[1] = {Elem<TS>::to_float(r.s[c])};
    if (l == 0) {
      float sums[2] = {st.s_sum, st.q_sum};
      const float k[2] = {kLog2e, k2};
      online_add<1>(st.s_max, sums, k, x);
      st.s_sum = sums[0];
      st.q_sum = sums[1];
    } else {
      fixed_add<1>(s_max_thread, st.q_sum, k2, x);
    }
    const float xt[1] = {Elem<TT>::to_float(t[c])};
    float ts[1] = {st.t_sum};
    const float kt[1] = {k2};
    online_add<1>(st.t_max, ts, kt, xt);
    st.t_sum = ts[0];
  }
  if (l == 0) s_max_thread = st.s_max;
  else st.s_max = s_max_thread;  // what q_sum is relative to, for the merge
  return st;
}

// Row constants from level 0's merged sums (every thread).
MOEKD_HD RowConsts row_consts(const Pass1Level& level0, float s_y) {
  RowConsts rc;
  rc.s_max = level0.s_max;
  rc.s_lse = logf(level0.s_sum);
  rc.s_lse2 = log2f(level0.s_sum);
  rc.log_sigma_y = (s_y - rc.s_max) - rc.s_lse;
  rc.u_rest = rc.u_over_D = rc.u_log_D_rest = 0.0f;
  return rc;
}

// Leader only: level l's pass-1 constants. A fully masked row (max −inf) gets
// s − s_max = NaN in the passes: NaN everywhere, as log_softmax gives.
MOEKD_HD void publish_pass1(LevelConsts* lc, int l, const Pass1Level& merged) {
  lc[l].q_lse = logf(merged.q_sum);
  lc[l].q_lse2 = log2f(merged.q_sum);
  lc[l].t_max = merged.t_max;
  lc[l].t_lse2 = log2f(merged.t_sum);
}

// ---- pass 2: u-weighted sums, per level -------------------------------------------------

// One thread's (or, merged, the row's) sums for one level: moekd::RowSums split by
// level, the target's u (and its log D) apart from the rest, as moekd::row_loss needs.
struct LevelSums {
  float u_rest, u_target, u_over_D, u_log_D_rest, u_log_q;
};

MOEKD_HD LevelSums level_sums_identity() { return {0.0f, 0.0f, 0.0f, 0.0f, 0.0f}; }

MOEKD_HD void level_sums_merge(LevelSums& a, const LevelSums& b) {
  a.u_rest += b.u_rest;
  a.u_target += b.u_target;
  a.u_over_D += b.u_over_D;
  a.u_log_D_rest += b.u_log_D_rest;
  a.u_log_q += b.u_log_q;
}

// W classes c0 .. c0+W-1 at one level: their moekd::RowSums terms.
template <int W>
MOEKD_HD void pass2_classes(LevelSums& s, const LevelConsts& c, const RowConsts& rc, int y, int c0,
                            const float (&x)[W], const float (&t)[W]) {
  MOEKD_UNROLL
  for (int i = 0; i < W; ++i) {
    const float d = x[i] - rc.s_max;
    const float sigma = exp2f(fmaf(d, kLog2e, -rc.s_lse2));
    const float pi = exp2f(fmaf(t[i] - c.t_max, c.k2, -c.t_lse2));
    const float log_q = fmaf(d, c.inv_tau, -c.q_lse);
    const bool is_target = c0 + i == y;
    const float D = expert_normaliser(c.expm1_beta, sigma);
    const float inv_D = fast_rcp(D);
    const float u = c.weight * pi * (is_target ? c.exp_beta : 1.0f) * inv_D;
    const float u_other = is_target ? 0.0f : u;  // the target's terms go to row_loss's closed form
    s.u_target += u - u_other;
    s.u_rest += u_other;
    s.u_over_D += u * inv_D;
    s.u_log_D_rest += u_other * (fast_log2(D) * kLn2);
    s.u_log_q += u == 0.0f ? 0.0f : u * log_q;  // 0 · log 0 for a class masked in both
  }
}

template <class TS, class TT>
MOEKD_HD LevelSums pass2_level(const RowCtx<TS, TT>& r, const RowConsts& rc, int l) {
  const LevelConsts& c = r.lc[l];
  const TT* t = r.level(l);
  LevelSums s = level_sums_identity();
  int j = 0;
  for (int ch = r.gi; ch < r.nchunks; ch += r.G, ++j) {
    const int c0 = r.head + ch * kChunk;
    float x[kChunk], tv[kChunk];
    load_chunk(r, r.s, 0, j, c0, false, x);
    load_chunk(r, t, 1 + l, j, c0, false, tv);
    pass2_classes<kChunk>(s, c, rc, r.y, c0, x, tv);
  }
  for (int e = r.gi; e < r.nscalar; e += r.G) {
    const int c1 = r.scalar_class(e);
    const float x[1] = {Elem<TS>::to_float(r.s[c1])};
    const float tv[1] = {Elem<TT>::to_float(t[c1])};
    pass2_classes<1>(s, c, rc, r.y, c1, x, tv);
  }
  return s;
}

// Leader only: level l's merged sums. Every thread adds the level-independent ones to rc.
MOEKD_HD void publish_pass2(LevelConsts* lc, int l, const LevelSums& merged) {
  lc[l].u_level = merged.u_target + merged.u_rest;
  lc[l].u_log_q = merged.u_log_q;
  lc[l].u_target = merged.u_target;
}

MOEKD_HD void add_level_totals(RowConsts& rc, const LevelSums& merged) {
  rc.u_rest += merged.u_rest;
  rc.u_over_D += merged.u_over_D;
  rc.u_log_D_rest += merged.u_log_D_rest;
}

// The row's moekd::RowSums from the published per-level sums and the row totals.
// Loops run to the constant kMaxLevels (and stop at num_levels), so they unroll and
// the sums stay in registers.
MOEKD_HD RowSums gather_sums(const LevelConsts* lc, const RowConsts& rc, int num_levels) {
  RowSums sums;
  row_sums_clear(sums, kMaxLevels);
  sums.u_rest = rc.u_rest;
  sums.u_over_D = rc.u_over_D;
  sums.u_log_D_rest = rc.u_log_D_rest;
  MOEKD_UNROLL
  for (int l = 0; l < kMaxLevels; ++l) {
    if (l >= num_levels) break;
    sums.u_level[l] = lc[l].u_level;
    sums.u_log_q[l] = lc[l].u_log_q;
    sums.u_target[l] = lc[l].u_target;
  }
  return sums;
}

// The stats and what pass 3 needs (every thread): moekd::finalize_row_stats. The loss
// is finalize_loss, apart, because only one thread needs it.
MOEKD_HD RowResult finalize_stats(const LevelConsts* lc, const RowConsts& rc, const Params& p) {
  return finalize_row_stats(gather_sums(lc, rc, p.num_levels), p, rc.log_sigma_y);
}

// The row's loss: moekd::row_loss, the formula the CPU kernel uses too. It works in
// double with a log1p per level, so the kernel calls it from one thread per row,
// between passes 2 and 3, where only the row constants are live; its level loops
// unroll (constant bound), so the sums stay in registers. ptxas (sm_90) reports no
// spills and no stack frame at the kernel's 80-register cap, as
// tests/test_cuda_backend.py checks.
MOEKD_HD float finalize_loss(const LevelConsts* lc, const RowConsts& rc, const Params& p) {
  return row_loss(gather_sums(lc, rc, p.num_levels), p, rc.log_sigma_y);
}

// Leader only: R_ℓ for pass 3.
MOEKD_HD void publish_R(LevelConsts* lc, const RowResult& res, int L) {
  MOEKD_UNROLL
  for (int l = 0; l < kMaxLevels; ++l) {
    if (l >= L) break;
    lc[l].R = res.R[l];
  }
}

// ---- pass 3: the gradient ------------------------------------------------------------

// Level l's share of ∂loss/∂s for W classes (the per-level terms in moekd_math.h).
template <int W>
MOEKD_HD void pass3_level(float (&g)[W], const LevelConsts& c, const RowResult& res, float expert_weight,
                          int y, int c0, const float (&d)[W], const float (&sigma)[W], const float (&t)[W]) {
  MOEKD_UNROLL
  for (int i = 0; i < W; ++i) {
    const float pi = exp2f(fmaf(t[i] - c.t_max, c.k2, -c.t_lse2));
    const float q = exp2f(fmaf(d[i], c.k2, -c.q_lse2));
    const float D = expert_normaliser(c.expm1_beta, sigma[i]);
    const float inv_D = fast_rcp(D);
    const float r = c.weight * pi * (c0 + i == y ? c.exp_beta : 1.0f) * inv_D * res.inv_G;
    g[i] += expert_weight * (r - r * inv_D) + c.gate_tau * (c.R * q - r);
  }
}

// σ, s − s_max and the level-independent gradient term λ_e (σ A − [c = y]).
template <int W>
MOEKD_HD void pass3_start(float (&g)[W], float (&d)[W], float (&sigma)[W], const Params& p, const RowConsts& rc,
                          const RowResult& res, int y, int c0, const float (&x)[W]) {
  MOEKD_UNROLL
  for (int i = 0; i < W; ++i) {
    d[i] = x[i] - rc.s_max;
    sigma[i] = exp2f(fmaf(d[i], kLog2e, -rc.s_lse2));
    g[i] = grad_base_term(p, res, sigma[i], c0 + i == y);
  }
}

// The gradient's scale w (a mean reduction's 1/n, computed on the device), read once
// per thread and only by rows that reach pass 3: an ignored row stays exactly 0 even
// if w is inf (no valid row at all), and the host never reads w (no sync).
MOEKD_HD float read_grad_scale(const float* grad_scale) {
#if defined(__CUDA_ARCH__)
  return grad_scale != nullptr ? __ldg(grad_scale) : 1.0f;
#else
  return grad_scale != nullptr ? *grad_scale : 1.0f;
#endif
}

// Writes w · ∂loss/∂s: the product is formed in float, before rounding to TS.
template <class TS, class TT>
MOEKD_HD void pass3(const RowCtx<TS, TT>& r, const Params& p, const RowConsts& rc, const RowResult& res,
                    float w) {
  int j = 0;
  for (int ch = r.gi; ch < r.nchunks; ch += r.G, ++j) {
    const int c0 = r.head + ch * kChunk;
    float x[kChunk], d[kChunk], sigma[kChunk], g[kChunk];
    load_chunk(r, r.s, 0, j, c0, false, x);
    pass3_start<kChunk>(g, d, sigma, p, rc, res, r.y, c0, x);
    for (int l = 0; l < r.L; ++l) {
      float t[kChunk];
      load_chunk(r, r.level(l), 1 + l, j, c0, false, t);
      pass3_level<kChunk>(g, r.lc[l], res, p.expert_weight, r.y, c0, d, sigma, t);
    }
    MOEKD_UNROLL
    for (int i = 0; i < kChunk; ++i) g[i] *= w;
    Vec16 v[Elem<TS>::kVecs];
    Elem<TS>::pack(g, v);
    Vec16* dst = reinterpret_cast<Vec16*>(r.g + c0);
    MOEKD_UNROLL
    for (int i = 0; i < Elem<TS>::kVecs; ++i) dst[i] = v[i];
  }
  for (int e = r.gi; e < r.nscalar; e += r.G) {
    const int c = r.scalar_class(e);
    const float x[1] = {Elem<TS>::to_float(r.s[c])};
    float d[1], sigma[1], g[1];
    pass3_start<1>(g, d, sigma, p, rc, res, r.y, c, x);
    for (int l = 0; l < r.L; ++l) {
      const float t[1] = {Elem<TT>::to_float(r.level(l)[c])};
      pass3_level<1>(g, r.lc[l], res, p.expert_weight, r.y, c, d, sigma, t);
    }
    r.g[c] = Elem<TS>::from_float(g[0] * w);
  }
}

// Whether this thread wrote class c in pass 3 (its chunk, or its scalar item).
template <class TS, class TT>
MOEKD_HD bool owns_class(const RowCtx<TS, TT>& r, int c) {
  const int end = r.head + kChunk * r.nchunks;
  if (c >= r.head && c < end) return (c - r.head) / kChunk % r.G == r.gi;
  return (c < r.head ? c : c - kChunk * r.nchunks) % r.G == r.gi;
}

// The target's gradient element, regrouped as the CPU kernel's target_gradient: pass 3's
// λ_e (σ_y A − 1 + Σ_ℓ r_ℓy (1 − 1/D_ℓy)) cancels once the experts saturate (r_y → 1);
// with 1 − Σ_ℓ r_ℓy = u_rest/G it is λ_e (σ_y A − u_rest/G − Σ_ℓ r_ℓy/D_ℓy). Once per
// row, by the thread that wrote the element, after its pass 3; levels in a rolled loop
// over the shared level constants.
template <class TS, class TT>
MOEKD_HD void fix_target_gradient(const RowCtx<TS, TT>& r, const Params& p, const RowConsts& rc,
                                  const RowResult& res, float w) {
  const float d = Elem<TS>::to_float(r.s[r.y]) - rc.s_max;
  const float sigma = exp2f(fmaf(d, kLog2e, -rc.s_lse2));
  float expert = fmaf(sigma, res.A, -rc.u_rest * res.inv_G);
  float gate = 0.0f;
  for (int l = 0; l < r.L; ++l) {
    const LevelConsts& c = r.lc[l];
    const float pi = exp2f(fmaf(Elem<TT>::to_float(r.level(l)[r.y]) - c.t_max, c.k2, -c.t_lse2));
    const float q = exp2f(fmaf(d, c.k2, -c.q_lse2));
    const float inv_D = fast_rcp(expert_normaliser(c.expm1_beta, sigma));
    const float r_y = c.weight * pi * c.exp_beta * inv_D * res.inv_G;
    expert -= r_y * inv_D;
    gate += c.gate_tau * (c.R * q - r_y);
  }
  // A zero weight drops its term, as in the loss: no 0 · inf.
  r.g[r.y] = Elem<TS>::from_float(w * ((p.expert_weight != 0.0f ? p.expert_weight * expert : 0.0f) + gate));
}

// Ignored rows get a zero gradient row, rows with an out-of-range target a NaN one.
template <class TS, class TT>
MOEKD_HD void fill_grad(const RowCtx<TS, TT>& r, float value) {
  float x[kChunk];
  MOEKD_UNROLL
  for (int i = 0; i < kChunk; ++i) x[i] = value;
  Vec16 v[Elem<TS>::kVecs];
  Elem<TS>::pack(x, v);
  for (int ch = r.gi; ch < r.nchunks; ch += r.G) {
    Vec16* dst = reinterpret_cast<Vec16*>(r.g + r.head + ch * kChunk);
    MOEKD_UNROLL
    for (int i = 0; i < Elem<TS>::kVecs; ++i) dst[i] = v[i];
  }
  for (int e = r.gi; e < r.nscalar; e += r.G) r.g[r.scalar_class(e)] = Elem<TS>::from_float(value);
}

// What a row is: 0 normal, 1 ignored (zeros), 2 target out of range (NaN; never read at y).
MOEKD_HD int row_kind(long long y, int C, long long ignore_index) {
  if (y == ignore_index) return 1;
  return (y < 0 || y >= C) ? 2 : 0;
}

}  // namespace cuda_row
}  // namespace moekd
