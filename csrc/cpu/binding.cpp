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

#include "common/binding_inputs.h"
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
                                    int64_t num_threads, double grad_scale, bool need_grad) {
  TORCH_CHECK(student.device().is_cpu() && teacher.device().is_cpu() && target.device().is_cpu(),
              "the cpu backend takes CPU tensors");
  const moekd::binding::RowInputs in = moekd::binding::check_row_inputs(
      student, teacher, target, temperatures, expert_strengths, level_weights, "cpu");
  const auto student_dtype = kernel_dtype(in.student, "student_logits", false);
  const auto teacher_dtype = kernel_dtype(in.teacher, "teacher_logits", true);
  std::vector<at::Tensor> out = moekd::binding::allocate_outputs(in, need_grad);
  at::Tensor &loss = out[0], &log_likelihood = out[1], &agreement = out[2], &grad = out[3];
  if (need_grad) advise_huge_pages(grad.data_ptr(), grad.nbytes());

  moekd::cpu::RowsArgs args;
  args.num_rows = in.N;
  args.num_classes = in.C;
  args.student = in.student.data_ptr();
  args.student_dtype = student_dtype;
  args.student_row_stride = in.student.stride(0);
  args.teacher = in.teacher.data_ptr();
  args.teacher_dtype = teacher_dtype;
  args.teacher_level_stride = in.teacher.stride(0);
  args.teacher_row_stride = in.teacher.stride(1);
  args.target = in.target.data_ptr<int64_t>();
  args.loss = loss.data_ptr<float>();
  args.log_likelihood = log_likelihood.data_ptr<float>();
  args.agreement = agreement.data_ptr<float>();
  args.grad = need_grad ? grad.data_ptr() : nullptr;
  args.grad_scale = static_cast<float>(grad_scale);

  const moekd::Params params =
      moekd::make_params(static_cast<int>(in.L), temperatures.data(), expert_strengths.data(),
                         level_weights.data(), gate_weight, expert_weight, ignore_index);
  {
    // Pure C++ on raw pointers: other Python threads may run meanwhile.
    pybind11::gil_scoped_release no_gil;
    moekd::cpu::moe_kd_rows(args, params,
                            static_cast<int>(num_threads > 0 ? num_threads : at::get_num_threads()));
  }
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "moekd_kernels fused MoE-KD loss, C++/OpenMP CPU kernel";
  m.def("moe_kd_rows", &moe_kd_rows,
        "(student (N,C), teacher (L,N,C), target (N,), temperatures, expert_strengths, "
        "level_weights, gate_weight, expert_weight, ignore_index, num_threads, grad_scale, need_grad) -> "
        "[loss, log_likelihood, agreement, grad_scale · grad, or None without need_grad]");
  m.def("exp_for_test", &moekd::cpu::exp_for_test, "the kernel's exp, for accuracy tests");
  m.def("log_for_test", &moekd::cpu::log_for_test, "the kernel's log (x >= 1), for accuracy tests");
}
