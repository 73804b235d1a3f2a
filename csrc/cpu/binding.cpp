// PyTorch binding of the CPU kernel: checks tensors, allocates the outputs,
// passes raw pointers and strides to moekd::cpu::moe_kd_rows. Python-facing
// argument errors are raised earlier, in moekd_kernels/cpu_backend.py; the
// checks here guard the pointers the kernel will read.
#include <torch/extension.h>

#include <cstdint>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "cpu/moekd_cpu.h"

namespace {

moekd::cpu::DType kernel_dtype(const at::Tensor& t, const char* name, bool allow_double) {
  switch (t.scalar_type()) {
    case at::kFloat: return moekd::cpu::DType::kFloat32;
    case at::kBFloat16: return moekd::cpu::DType::kBFloat16;
    case at::kHalf: return moekd::cpu::DType::kFloat16;
    case at::kDouble:
      if (allow_double) return moekd::cpu::DType::kFloat64;
      [[fallthrough]];
    default:
      TORCH_CHECK_TYPE(false, name, " must be float32, bfloat16 or float16",
                       allow_double ? " or float64" : "", " for the cpu backend, got ",
                       t.scalar_type());
  }
}

// The gradient is a fresh N×C buffer that the kernel writes once. On Linux a
// large allocation arrives as untouched pages, and faulting them in 4 KiB at a
// time can cost more than the kernel itself; asking for transparent huge pages
// (honoured when THP is in "madvise" or "always" mode) makes that 512× fewer
// faults. Only whole 2 MiB pages inside the buffer are advised.
void advise_huge_pages(void* data, size_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t{2} << 20;
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(data) + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t end = (reinterpret_cast<uintptr_t>(data) + bytes) & ~(kHuge - 1);
  if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);  // a hint
#else
  (void)data;
  (void)bytes;
#endif
}

std::vector<at::Tensor> moe_kd_rows(at::Tensor student, at::Tensor teacher, at::Tensor target,
                                    std::vector<double> temperatures,
                                    std::vector<double> expert_strengths,
                                    std::vector<double> level_weights, double gate_weight,
                                    double expert_weight, int64_t ignore_index,
                                    int64_t num_threads, double grad_scale) {
  TORCH_CHECK_VALUE(student.dim() == 2, "student_logits must be (N, C), got ", student.sizes());
  TORCH_CHECK_VALUE(teacher.dim() == 3, "teacher_logits must be (L, N, C), got ", teacher.sizes());
  TORCH_CHECK_VALUE(target.dim() == 1, "target must be (N,), got ", target.sizes());
  TORCH_CHECK(student.device().is_cpu() && teacher.device().is_cpu() && target.device().is_cpu(),
              "the cpu backend takes CPU tensors");
  const int64_t N = student.size(0), C = student.size(1);
  const int64_t L = teacher.size(0);
  TORCH_CHECK_VALUE(teacher.size(1) == N && teacher.size(2) == C,
                    "teacher_logits must be (L, ", N, ", ", C, "), got ", teacher.sizes());
  TORCH_CHECK_VALUE(target.size(0) == N, "target must have ", N, " entries, got ", target.size(0));
  TORCH_CHECK_VALUE(L >= 1 && L <= moekd::kMaxLevels, "teacher_logits must have 1 to ",
                    moekd::kMaxLevels, " levels for the cpu backend, got L=", L);
  TORCH_CHECK_VALUE(static_cast<int64_t>(temperatures.size()) == L &&
                        static_cast<int64_t>(expert_strengths.size()) == L &&
                        static_cast<int64_t>(level_weights.size()) == L,
                    "one temperature, expert strength and level weight per level expected");
  const auto student_dtype = kernel_dtype(student, "student_logits", false);
  const auto teacher_dtype = kernel_dtype(teacher, "teacher_logits", true);
  TORCH_CHECK_TYPE(!target.is_floating_point() && !target.is_complex() &&
                       target.scalar_type() != at::kBool,
                   "target must hold integer class indices, got ", target.scalar_type());

  // Rows are read through their stride; only a strided class dimension forces a copy.
  if (C > 1 && student.stride(1) != 1) student = student.contiguous();
  if (C > 1 && teacher.stride(2) != 1) teacher = teacher.contiguous();
  target = target.to(at::kLong).contiguous();

  const auto stats_options = student.options().dtype(at::kFloat);
  at::Tensor loss = at::empty({N}, stats_options);
  at::Tensor log_likelihood = at::empty({N}, stats_options);
  at::Tensor agreement = at::empty({N}, stats_options);
  at::Tensor grad = at::empty({N, C}, student.options().memory_format(at::MemoryFormat::Contiguous));
  advise_huge_pages(grad.data_ptr(), grad.nbytes());

  moekd::cpu::RowsArgs args;
  args.num_rows = N;
  args.num_classes = C;
  args.student = student.data_ptr();
  args.student_dtype = student_dtype;
  args.student_row_stride = student.stride(0);
  args.teacher = teacher.data_ptr();
  args.teacher_dtype = teacher_dtype;
  args.teacher_level_stride = teacher.stride(0);
  args.teacher_row_stride = teacher.stride(1);
  args.target = target.data_ptr<int64_t>();
  args.loss = loss.data_ptr<float>();
  args.log_likelihood = log_likelihood.data_ptr<float>();
  args.agreement = agreement.data_ptr<float>();
  args.grad = grad.data_ptr();
  args.grad_scale = static_cast<float>(grad_scale);

  const moekd::Params params =
      moekd::make_params(static_cast<int>(L), temperatures.data(), expert_strengths.data(),
                         level_weights.data(), gate_weight, expert_weight, ignore_index);
  {
    // Pure C++ on raw pointers: other Python threads may run meanwhile.
    pybind11::gil_scoped_release no_gil;
    moekd::cpu::moe_kd_rows(args, params,
                            static_cast<int>(num_threads > 0 ? num_threads : at::get_num_threads()));
  }
  return {loss, log_likelihood, agreement, grad};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "moekd_kernels fused MoE-KD loss, C++/OpenMP CPU kernel";
  m.def("moe_kd_rows", &moe_kd_rows,
        "(student (N,C), teacher (L,N,C), target (N,), temperatures, expert_strengths, "
        "level_weights, gate_weight, expert_weight, ignore_index, num_threads, grad_scale) -> "
        "[loss, log_likelihood, agreement, grad_scale · grad]");
  m.def("exp_for_test", &moekd::cpu::exp_for_test, "the kernel's exp, for accuracy tests");
  m.def("log_for_test", &moekd::cpu::log_for_test, "the kernel's log (x >= 1), for accuracy tests");
}
