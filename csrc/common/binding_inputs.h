// What the two PyTorch bindings (csrc/cpu/binding.cpp, csrc/cuda/binding.cpp) check
// and prepare alike: the shapes of student (N, C), teacher (L, N, C) and target (N,),
// the per-level options, rows with unit class stride, and the fresh outputs.
// torch/extension.h only; the kernels themselves never include this file. The
// Python backends check the user's arguments first: these checks guard the raw
// pointers the kernels will read.
#pragma once

#include <torch/extension.h>

#include <string>
#include <vector>

#include "common/moekd_math.h"

namespace moekd {
namespace binding {

// "[4, 10]". Error messages spell shapes with this rather than by streaming
// t.sizes(): on an H100 machine with torch 2.11 a message built that way crashed
// the process (streaming a c10::Device was fine).
inline std::string shape_of(const at::Tensor& t) {
  std::string out = "[";
  for (int64_t d = 0; d < t.dim(); ++d) out += (d ? ", " : "") + std::to_string(t.size(d));
  return out + "]";
}

struct RowInputs {
  at::Tensor student, teacher, target;  // target as contiguous int64
  int64_t N, C, L;
};

// Checks the shapes, the level count against `backend`'s limit and the per-level
// options, and the target's dtype; copies only a strided class dimension.
inline RowInputs check_row_inputs(at::Tensor student, at::Tensor teacher, at::Tensor target,
                                  const std::vector<double>& temperatures,
                                  const std::vector<double>& expert_strengths,
                                  const std::vector<double>& level_weights, const char* backend) {
  TORCH_CHECK_VALUE(student.dim() == 2, "student_logits must be (N, C), got ", shape_of(student));
  TORCH_CHECK_VALUE(teacher.dim() == 3, "teacher_logits must be (L, N, C), got ", shape_of(teacher));
  TORCH_CHECK_VALUE(target.dim() == 1, "target must be (N,), got ", shape_of(target));
  const int64_t N = student.size(0), C = student.size(1), L = teacher.size(0);
  TORCH_CHECK_VALUE(teacher.size(1) == N && teacher.size(2) == C, "teacher_logits must be (L, ", N, ", ", C,
                    "), got ", shape_of(teacher));
  TORCH_CHECK_VALUE(target.size(0) == N, "target must have ", N, " entries, got ", target.size(0));
  TORCH_CHECK_VALUE(L >= 1 && L <= kMaxLevels, "teacher_logits must have 1 to ", kMaxLevels,
                    " levels for the ", backend, " backend, got L=", L);
  TORCH_CHECK_VALUE(static_cast<int64_t>(temperatures.size()) == L &&
                        static_cast<int64_t>(expert_strengths.size()) == L &&
                        static_cast<int64_t>(level_weights.size()) == L,
                    "one temperature, expert strength and level weight per level expected");
  TORCH_CHECK_TYPE(!target.is_floating_point() && !target.is_complex() && target.scalar_type() != at::kBool,
                   "target must hold integer class indices, got ", target.scalar_type());
  // Rows are read through their stride; only a strided class dimension forces a copy.
  if (C > 1 && student.stride(1) != 1) student = student.contiguous();
  if (C > 1 && teacher.stride(2) != 1) {
    // One teacher head at L temperatures arrives as a level-stride-0 view: copy the
    // one head, never L of it.
    teacher = teacher.stride(0) == 0 && L > 1
                  ? teacher.select(0, 0).contiguous().unsqueeze(0).expand({L, N, C})
                  : teacher.contiguous();
  }
  return {student, teacher, target.to(at::kLong).contiguous(), N, C, L};
}

// loss, log_likelihood, agreement (N,) float32 and the gradient (N, C) in the
// student's dtype, contiguous, on the student's device. Without need_grad the
// gradient is an undefined tensor (None in Python): no N×C buffer at all.
inline std::vector<at::Tensor> allocate_outputs(const RowInputs& in, bool need_grad) {
  const auto f32 = in.student.options().dtype(at::kFloat);
  return {at::empty({in.N}, f32), at::empty({in.N}, f32), at::empty({in.N}, f32),
          need_grad ? at::empty({in.N, in.C}, in.student.options().memory_format(at::MemoryFormat::Contiguous))
                    : at::Tensor()};
}

}  // namespace binding
}  // namespace moekd
