// MoE-KD per-row math, shared by the C++ CPU kernel and the CUDA kernel.
//
// Framework-free on purpose: plain floats and a params struct, no PyTorch or
// CUDA runtime headers, so `nvcc -c` and a host compiler both take it as is.
//
// One row, C classes, L levels (symbols as in docs/math.md, definitions):
//   σ = softmax(s), q_ℓ = softmax(s/τ_ℓ), π_ℓ = softmax(t_ℓ/τ_ℓ)
//   D_ℓc = 1 + expm1(β_ℓ) σ_c
//   u_ℓc = w_ℓ π_ℓc exp(β_ℓ [c=y]) / D_ℓc,  G = Σ u,  r = u / G
// A kernel makes three passes over a row:
//   1. max and sum-exp of s, s/τ_ℓ and t_ℓ/τ_ℓ
//   2. Σ over classes of the u-weighted terms, target apart   → RowSums
//   3. the gradient, element by element (grad_base_term + the per-level terms)
// and turns the pass-2 sums into loss and stats once per row: finalize_row_stats()
// forms G and the stats, row_loss() the loss. They are the one home of those
// formulas for both kernels (the CPU calls both through finalize_row(); the CUDA
// kernel calls the first in every thread and the second in one, see moekd_row.h).
// The per-element loops of passes 1–3 are written in each kernel, because each
// vectorises them its own way (a polynomial exp under `omp simd` on the CPU,
// exp2 per lane on the GPU); what they must compute is the RowSums field list
// and the gradient formula below.
#pragma once

#include <math.h>

#if defined(__CUDACC__)
#define MOEKD_HD __host__ __device__ __forceinline__
#define MOEKD_UNROLL _Pragma("unroll")
#else
#define MOEKD_HD inline
#define MOEKD_UNROLL
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

// ---- pass 2: sums over classes ------------------------------------------------

// Sums of u-weighted terms over a row (or a slice of it, added field by field).
// They are unnormalised: finalize_row divides by G.
// The target class y is kept apart from the rest wherever finalize_row needs it:
// G = Σ_ℓ u_ℓy + u_rest is then formed from two non-negative parts (agreement
// Σ_ℓ u_ℓy / G cannot round above 1), and the loss is a sum of one-signed terms
// (see finalize_row) instead of one that cancels when the experts saturate.
struct RowSums {
  float u_rest;                   // Σ_ℓ Σ_{c≠y} u_ℓc          (G − Σ_ℓ u_ℓy)
  float u_over_D;                 // Σ_ℓc u_ℓc / D_ℓc          → A · G
  float u_log_D_rest;             // Σ_ℓ Σ_{c≠y} u_ℓc log D_ℓc
  float u_level[kMaxLevels];      // Σ_c u_ℓc                  → R_ℓ · G
  float u_log_q[kMaxLevels];      // Σ_c u_ℓc log q_ℓc (0 where u = 0)
  float u_target[kMaxLevels];     // u_ℓy
};

MOEKD_HD void row_sums_clear(RowSums& s, int num_levels) {
  s.u_rest = s.u_over_D = s.u_log_D_rest = 0.0f;
  for (int l = 0; l < num_levels; ++l) s.u_level[l] = s.u_log_q[l] = s.u_target[l] = 0.0f;
}

// D_ℓc = 1 + expm1(β) σ_c, never exp(β)·σ − σ.
MOEKD_HD float expert_normaliser(float expm1_beta, float sigma) { return fmaf(expm1_beta, sigma, 1.0f); }

// ---- finalize: loss and stats of one row -----------------------------------------

struct RowResult {
  float loss;             // −λ_e Σ r log p(y) − λ_g Σ_ℓ τ² Σ_c r log q
  float log_likelihood;   // m = log σ_y + log G
  float agreement;        // a = Σ_ℓ r_ℓy
  float inv_G;            // 1 / G, to form r = u / G in pass 3
  float A;                // Σ_ℓc r_ℓc / D_ℓc
  float R[kMaxLevels];    // R_ℓ = Σ_c r_ℓc
};

// G, the stats and what pass 3 needs: all of finalize_row but the loss. G is
// formed once, from the target's u and the rest, so the agreement
// Σ_ℓ u_ℓy / (Σ_ℓ u_ℓy + u_rest) cannot round above 1 (IEEE division is monotone)
// and is NaN when an input is. Float, like the sums: one rounding per value.
// Loops run to the constant kMaxLevels and stop at num_levels: a CUDA caller's
// loops unroll fully, so s, p and out stay in registers, not local memory.
MOEKD_HD RowResult finalize_row_stats(const RowSums& s, const Params& p, float log_sigma_y) {
  RowResult out;
  float u_target = 0.0f;  // Σ_ℓ u_ℓy
  MOEKD_UNROLL
  for (int l = 0; l < kMaxLevels && l < p.num_levels; ++l) u_target += s.u_target[l];
  const float G = u_target + s.u_rest;
  const float inv_G = 1.0f / G;
  out.loss = 0.0f;  // finalize_row's
  out.log_likelihood = log_sigma_y + logf(G);
  out.agreement = u_target / G;
  out.inv_G = inv_G;
  out.A = s.u_over_D * inv_G;
  MOEKD_UNROLL
  for (int l = 0; l < kMaxLevels && l < p.num_levels; ++l) out.R[l] = s.u_level[l] * inv_G;
  return out;
}

// The loss, regrouped. Σ_ℓc r log p_ℓc(y) = log σ_y + Σ_ℓ β_ℓ r_ℓy − Σ_ℓc r log D
// adds terms of size β and |log σ_y| whose sum vanishes once the experts saturate
// (r_y → 1), and their rounding would swamp a small loss. With 1 − a = u_rest / G
// and log p_ℓy(y) = −log(1 + e^−β_ℓ (1 − σ_y)/σ_y),
//   −G Σ_ℓc r log p_ℓc(y) = −u_rest log σ_y + Σ_{c≠y} u log D
//                           + Σ_ℓ u_ℓy log1p(e^−β_ℓ (1 − σ_y)/σ_y),
// and −G Σ_ℓ τ² Σ_c r log q = −Σ_ℓ τ² Σ_c u log q: every term is non-negative, so
// the loss keeps its relative precision whatever its size. (1 − σ_y)/σ_y is
// expm1(−log σ_y), never 1/σ_y − 1 (σ_y may be e^−20000 for logits of 1e4).
// Once per row, in double: a few transcendentals per level, nothing per class.
// This is the one place the loss is formed, for the C++ and the CUDA kernel alike.
MOEKD_HD float row_loss(const RowSums& s, const Params& p, double log_sigma_y) {
  // A zero weight drops its term: a masked target (log σ_y = −inf) must not give 0·inf.
  double loss = 0.0;  // the loss times G
  if (p.gate_weight != 0.0f) {
    double gate = 0.0;  // −Σ_ℓ τ² Σ_c u log q
    MOEKD_UNROLL
    for (int l = 0; l < kMaxLevels && l < p.num_levels; ++l)
      gate -= static_cast<double>(p.tau[l]) * p.tau[l] * s.u_log_q[l];
    loss = p.gate_weight * gate;
  }
  double u_target = 0.0;  // Σ_ℓ u_ℓy
  MOEKD_UNROLL
  for (int l = 0; l < kMaxLevels && l < p.num_levels; ++l) u_target += s.u_target[l];
  if (p.expert_weight != 0.0f) {
    double expert = s.u_log_D_rest;  // −G Σ_ℓc r log p_ℓc(y)
    if (s.u_rest != 0.0f) expert -= s.u_rest * log_sigma_y;  // 0 · log 0 = 0
    // m = −log σ_y >= 0 (+inf for a masked target); a sum that rounded below 1 can
    // leave log σ_y a hair above 0, read as σ_y = 1. NaN fails the test and stays NaN.
    const double m = log_sigma_y > 0.0 ? 0.0 : -log_sigma_y;
    const double odds = expm1(m);  // (1 − σ_y)/σ_y
    MOEKD_UNROLL
    for (int l = 0; l < kMaxLevels && l < p.num_levels; ++l) {
      if (s.u_target[l] == 0.0f) continue;
      // Past m ~ 709 odds overflows, and log1p(e^−β odds) = m − β to double precision.
      expert += s.u_target[l] * (odds < INFINITY ? log1p(odds / p.exp_beta[l]) : m - p.beta[l]);
    }
    loss += p.expert_weight * expert;
  }
  return static_cast<float>(loss / (u_target + s.u_rest));
}

// Loss, stats and pass-3 constants of one row from its pass-2 sums.
MOEKD_HD RowResult finalize_row(const RowSums& s, const Params& p, double log_sigma_y) {
  RowResult out = finalize_row_stats(s, p, static_cast<float>(log_sigma_y));
  out.loss = row_loss(s, p, log_sigma_y);
  return out;
}

// ---- pass 3: the gradient -------------------------------------------------------

// ∂loss/∂s_j = λ_e (σ_j A − [j = y])                                 (this term)
//            + Σ_ℓ [ λ_e r_ℓj (1 − 1/D_ℓj) + λ_g τ_ℓ (R_ℓ q_ℓj − r_ℓj) ]  (per level)
// with σ_j r_ℓj expm1(β)/D_ℓj written as r_ℓj (1 − 1/D_ℓj): bounded, no exp(β)·σ.
// At j = y the expert part cancels once the experts saturate; each kernel then forms
// that one element as λ_e (σ_y A − u_rest/G − Σ_ℓ r_ℓy/D_ℓy) + the gate terms, from its
// own intermediates (CPU: target_gradient, in double; CUDA: fix_target_gradient).
MOEKD_HD float grad_base_term(const Params& p, const RowResult& row, float sigma, bool is_target) {
  return p.expert_weight * (sigma * row.A - (is_target ? 1.0f : 0.0f));
}

}  // namespace moekd
