// Fused MoE-KD rows on the CPU: loss, stats and gradient in one call.
//
// Framework-free (raw pointers, element strides, moekd::Params) so the kernel
// compiles and can be tested without PyTorch; csrc/cpu/binding.cpp is the only
// file that knows about tensors.
#pragma once

#include <cstdint>

#include "common/moekd_math.h"

namespace moekd {
namespace cpu {

// kFloat64 is taken for the teacher only (precomputed teacher logits are often
// float64); the student and its gradient are float32, bfloat16 or float16.
enum class DType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2, kFloat64 = 3 };

// One call's tensors. Strides are in elements; the class dimension is contiguous.
struct RowsArgs {
  int64_t num_rows = 0;
  int64_t num_classes = 0;

  const void* student = nullptr;      // (N, C)
  DType student_dtype = DType::kFloat32;
  int64_t student_row_stride = 0;

  const void* teacher = nullptr;      // (L, N, C); L = Params::num_levels
  DType teacher_dtype = DType::kFloat32;
  int64_t teacher_level_stride = 0;
  int64_t teacher_row_stride = 0;

  // A top-k teacher instead (teacher == nullptr): the dense row it stands for is
  // topk_rest[ℓ, n] at every class and topk_values[ℓ, n, k] at topk_indices[ℓ, n, k]
  // − class_offset (indices are global; those outside [0, C) belong to other class
  // slices and are skipped, as are −inf values: padding). Listed indices are distinct.
  // Strides in elements, any of them (a level stride of 0 reads one head L times).
  const int64_t* topk_indices = nullptr;  // (L, N, K)
  const void* topk_values = nullptr;      // (L, N, K)
  DType topk_values_dtype = DType::kFloat32;
  const float* topk_rest = nullptr;       // (L, N)
  int64_t topk_k = 0;
  int64_t class_offset = 0;             // also shifts the target in the phase functions
  int64_t topk_index_strides[3] = {0, 0, 0};
  int64_t topk_value_strides[3] = {0, 0, 0};
  int64_t topk_rest_strides[2] = {0, 0};

  const int64_t* target = nullptr;    // (N,), contiguous

  float* loss = nullptr;              // (N,) outputs, contiguous
  float* log_likelihood = nullptr;
  float* agreement = nullptr;
  void* grad = nullptr;               // (N, C) in student_dtype, contiguous; nullptr: no
                                      // gradient pass (loss and stats bit-identical)

  // The gradient is written as grad_scale · ∂loss/∂s (a mean reduction's 1/n folded in,
  // so backward need not rescale N×C values). Ignored rows stay 0, bad rows NaN.
  float grad_scale = 1.0f;
};

// Fills every output row: ignored rows get zeros, rows whose target is out of
// [0, C) get NaN loss/stats/gradient (never an out-of-bounds read).
// Rows are split over num_threads OpenMP threads (<= 0: the OpenMP default).
void moe_kd_rows(const RowsArgs& args, const Params& params, int num_threads);

// ---- the loss in phases over a class slice (vocab-parallel; moekd_kernels/phases.py) ----
// The RowsArgs describe the slice: student (N, C_r), the teacher of the same classes
// (dense, or top-k with class_offset), target with global classes (shifted by
// class_offset; a target outside the slice is another slice's). Per-row vectors are
// (rows, N) float32, contiguous. Accumulation is float32 within blocks, double across.
enum class Phase : int {
  kMaxima = 0,     // out (1 + L, N): max s, max t_ℓ/τ_ℓ
  kSumsOfExp = 1,  // in the global maxima (1 + L, N); out (1 + 2L, N): Σ e^(s−M), Σ e^((s−M)/τ_ℓ), Σ e^(t_ℓ/τ_ℓ−M_ℓ)
  kEstep = 2,      // in (2 + 2L, N): max_s, lse_s, log_z_q (L), lse_t (L);
                   // out (3 + 3L, N): Σ u/D, Σ u log D, log σ_y, Σ_c u_ℓc, Σ_c u_ℓc log q_ℓc, u_ℓy
  kGradient = 3,   // in (4 + 3L, N): the kEstep inputs, then inv_G, A, R (L); writes
                   // args.grad (N, C_r) = grad_scale · ∂loss/∂s in the student's dtype
};

struct PhaseArgs {
  RowsArgs rows;                 // loss and stats are not used
  const float* row_in = nullptr;
  float* row_out = nullptr;
};

void moe_kd_phase(Phase phase, const PhaseArgs& args, const Params& params, int num_threads);

// exp and log as the kernel evaluates them, exposed for the accuracy tests.
// Their domains are the kernel's: exp for x <= 0 (or NaN), log for x >= 1 (or inf/NaN).
float exp_for_test(float x);
float log_for_test(float x);

}  // namespace cpu
}  // namespace moekd
