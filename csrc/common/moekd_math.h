// MoE-KD per-row math, shared by the C++ CPU kernel and the CUDA kernel.
//
// Framework-free on purpose: plain floats and a params struct, no PyTorch or
// CUDA runtime headers, so `nvcc -c` and a host compiler both take it as is.
//
// One row, C classes, L levels (symbols as in the README's "How it works"):
//   σ = softmax(s), q_ℓ = softmax(s/τ_ℓ), π_ℓ = softmax(t_ℓ/τ_ℓ)
//   D_ℓc = 1 + expm1(β_ℓ) σ_c
//   u_ℓc = w_ℓ π_ℓc exp(β_ℓ [c=y]) / D_ℓc,  G = Σ u,  r = u / G
// A kernel makes three passes over a row:
//   1. online max / sum-exp of s, s/τ_ℓ and t_ℓ/τ_ℓ            (LseState)
//   2. Σ over classes of the u-weighted terms                  (RowSums)
//   3. the gradient, element by element                        (grad_element)
// and turns the pass-2 sums into loss and stats with finalize_row().
#pragma once

#include <math.h>

#if defined(__CUDACC__)
#define MOEKD_HD __host__ __device__ __forceinline__
#else
#define MOEKD_HD inline
#endif

namespace moekd {

constexpr int kMaxLevels = 8;

// Everything a kernel needs besides the tensors; filled once per call on the host.
struct Params {
  int num_levels;
  float tau[kMaxLevels];           // τ_ℓ
  float inv_tau[kMaxLevels];       // 1 / τ_ℓ
  float beta[kMaxLevels];          // β_ℓ (<= 50, so exp(β) is finite in float32)
  float exp_beta[kMaxLevels];      // exp(β_ℓ): the target's boost in u
  float expm1_beta[kMaxLevels];    // expm1(β_ℓ): D without cancellation for small β
  float level_weight[kMaxLevels];  // w_ℓ, already normalised to sum 1
  float gate_weight;               // λ_g
  float expert_weight;             // λ_e
  long long ignore_index;
};

// Host-side fill; exp/expm1 in double so the float32 constants are correctly rounded.
inline Params make_params(int num_levels, const double* tau, const double* beta,
                          const double* level_weight, double gate_weight,
                          double expert_weight, long long ignore_index) {
  Params p{};
  p.num_levels = num_levels;
  for (int l = 0; l < num_levels; ++l) {
    p.tau[l] = (float)tau[l];
    p.inv_tau[l] = (float)(1.0 / tau[l]);
    p.beta[l] = (float)beta[l];
    p.exp_beta[l] = (float)exp(beta[l]);
    p.expm1_beta[l] = (float)expm1(beta[l]);
    p.level_weight[l] = (float)level_weight[l];
  }
  p.gate_weight = (float)gate_weight;
  p.expert_weight = (float)expert_weight;
  p.ignore_index = ignore_index;
  return p;
}

// ---- pass 1: online log-sum-exp ------------------------------------------------

// Running max m and Σ exp(x − m). −inf inputs (masked classes) add nothing, and an
// all −inf stream stays at (−inf, 0) without forming (−inf) − (−inf).
struct LseState {
  float max;
  float sum;
};

MOEKD_HD LseState lse_empty() { return {-INFINITY, 0.0f}; }

MOEKD_HD LseState lse_merge(LseState a, LseState b) {
  if (a.max == -INFINITY) return b;
  if (b.max == -INFINITY) return a;
  // A NaN max fails both tests above and turns the sum into NaN below: NaN propagates.
  const float m = fmaxf(a.max, b.max);
  return {m, a.sum * expf(a.max - m) + b.sum * expf(b.max - m)};
}

MOEKD_HD void lse_add(LseState& state, float x) { state = lse_merge(state, LseState{x, 1.0f}); }

// log Σ exp(x); −inf for an empty or fully masked stream. NaN inputs propagate via max.
MOEKD_HD float lse_value(LseState state) { return state.max + logf(state.sum); }

// ---- pass 2: sums over classes ------------------------------------------------

// Sums of u-weighted terms over a row (or a slice of it; merge with row_sums_merge).
// They are unnormalised: finalize_row divides by G.
struct RowSums {
  float u_total;                  // G = Σ_ℓc u_ℓc
  float u_over_D;                 // Σ_ℓc u_ℓc / D_ℓc          → A · G
  float u_log_D;                  // Σ_ℓc u_ℓc log D_ℓc
  float u_level[kMaxLevels];      // Σ_c u_ℓc                  → R_ℓ · G
  float u_log_q[kMaxLevels];      // Σ_c u_ℓc log q_ℓc (0 where u = 0)
  float u_target[kMaxLevels];     // u_ℓy
};

MOEKD_HD void row_sums_clear(RowSums& s, int num_levels) {
  s.u_total = s.u_over_D = s.u_log_D = 0.0f;
  for (int l = 0; l < num_levels; ++l) s.u_level[l] = s.u_log_q[l] = s.u_target[l] = 0.0f;
}

MOEKD_HD void row_sums_merge(RowSums& a, const RowSums& b, int num_levels) {
  a.u_total += b.u_total;
  a.u_over_D += b.u_over_D;
  a.u_log_D += b.u_log_D;
  for (int l = 0; l < num_levels; ++l) {
    a.u_level[l] += b.u_level[l];
    a.u_log_q[l] += b.u_log_q[l];
    a.u_target[l] += b.u_target[l];
  }
}

// D_ℓc = 1 + expm1(β) σ_c, never exp(β)·σ − σ.
MOEKD_HD float expert_normaliser(float expm1_beta, float sigma) { return fmaf(expm1_beta, sigma, 1.0f); }

// u_ℓc = w_ℓ π_ℓc exp(β[c=y]) / D_ℓc.
MOEKD_HD float responsibility_weight(const Params& p, int level, float pi, float D, bool is_target) {
  const float boost = is_target ? p.exp_beta[level] : 1.0f;
  return p.level_weight[level] * pi * boost / D;
}

// Adds class c at level ℓ: σ_c, π_ℓc and log q_ℓc = s_c/τ − LSE(s/τ) come from pass 1.
MOEKD_HD void row_sums_add(RowSums& s, const Params& p, int level, float sigma, float pi,
                           float log_q, bool is_target) {
  const float D = expert_normaliser(p.expm1_beta[level], sigma);
  const float u = responsibility_weight(p, level, pi, D, is_target);
  s.u_total += u;
  s.u_over_D += u / D;
  s.u_log_D += u * log1pf(p.expm1_beta[level] * sigma);
  s.u_level[level] += u;
  // 0 · log 0: a class masked in both teacher and student adds nothing.
  s.u_log_q[level] += u == 0.0f ? 0.0f : u * log_q;
  if (is_target) s.u_target[level] += u;
}

// ---- finalize: loss and stats of one row -----------------------------------------

struct RowResult {
  float loss;             // −λ_e Σ r log p(y) − λ_g Σ_ℓ τ² Σ_c r log q
  float log_likelihood;   // m = log σ_y + log G
  float agreement;        // a = Σ_ℓ r_ℓy
  float inv_G;            // 1 / G, to form r = u / G in pass 3
  float A;                // Σ_ℓc r_ℓc / D_ℓc
  float R[kMaxLevels];    // R_ℓ = Σ_c r_ℓc
};

MOEKD_HD RowResult finalize_row(const RowSums& s, const Params& p, float log_sigma_y) {
  RowResult out;
  const float inv_G = 1.0f / s.u_total;
  float boost_ll = 0.0f;   // Σ_ℓ β_ℓ r_ℓy
  float gate_ce = 0.0f;    // Σ_ℓ τ² Σ_c r log q
  float agreement = 0.0f;
  for (int l = 0; l < p.num_levels; ++l) {
    const float r_target = s.u_target[l] * inv_G;
    agreement += r_target;
    boost_ll += p.beta[l] * r_target;
    gate_ce += p.tau[l] * p.tau[l] * s.u_log_q[l] * inv_G;
    out.R[l] = s.u_level[l] * inv_G;
  }
  // Σ_ℓc r log p_ℓc(y) = log σ_y Σ r + Σ_ℓ β r_ℓy − Σ r log D, and Σ r = 1.
  const float expert_ll = log_sigma_y + boost_ll - s.u_log_D * inv_G;
  // A zero weight drops its term: a masked target (log σ_y = −inf) must not give 0·inf.
  float loss = 0.0f;
  if (p.expert_weight != 0.0f) loss -= p.expert_weight * expert_ll;
  if (p.gate_weight != 0.0f) loss -= p.gate_weight * gate_ce;
  out.loss = loss;
  out.log_likelihood = log_sigma_y + logf(s.u_total);
  out.agreement = agreement;
  out.inv_G = inv_G;
  out.A = s.u_over_D * inv_G;
  return out;
}

// ---- pass 3: the gradient -------------------------------------------------------

// Per-level contribution to ∂loss/∂s_j, given σ_j, π_ℓj and q_ℓj:
//   λ_e r_ℓj (1 − 1/D_ℓj)  +  λ_g τ_ℓ (R_ℓ q_ℓj − r_ℓj)
// (σ_j r_ℓj expm1(β)/D_ℓj rewritten as r_ℓj (1 − 1/D_ℓj): bounded, no exp(β)·σ.)
MOEKD_HD float grad_level_term(const Params& p, const RowResult& row, int level, float sigma,
                               float pi, float q, bool is_target) {
  const float D = expert_normaliser(p.expm1_beta[level], sigma);
  const float r = responsibility_weight(p, level, pi, D, is_target) * row.inv_G;
  return p.expert_weight * (r - r / D) + p.gate_weight * p.tau[level] * (row.R[level] * q - r);
}

// The level-independent part: λ_e (σ_j A − [j = y]). Add grad_level_term for each ℓ.
MOEKD_HD float grad_base_term(const Params& p, const RowResult& row, float sigma, bool is_target) {
  return p.expert_weight * (sigma * row.A - (is_target ? 1.0f : 0.0f));
}

}  // namespace moekd
