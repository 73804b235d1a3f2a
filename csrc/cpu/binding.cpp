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

// The kernel call both entry points share: outputs, the student and target fields, params.
std::vector<at::Tensor> run_rows(const moekd::binding::RowInputs& in, moekd::cpu::RowsArgs& args,
                                 const std::vector<double>& temperatures,
                                 const std::vector<double>& expert_strengths,
                                 const std::vector<double>& level_weights, double gate_weight,
                                 double expert_weight, int64_t ignore_index, int64_t num_threads,
                                 double grad_scale, bool need_grad) {
  const auto student_dtype = kernel_dtype(in.student, "student_logits", false);
  std::vector<at::Tensor> out = moekd::binding::allocate_outputs(in, need_grad);
  at::Tensor &loss = out[0], &log_likelihood = out[1], &agreement = out[2], &grad = out[3];
  if (need_grad) advise_huge_pages(grad.data_ptr(), grad.nbytes());

  args.num_rows = in.N;
  args.num_classes = in.C;
  args.student = in.student.data_ptr();
  args.student_dtype = student_dtype;
  args.student_row_stride = in.student.stride(0);
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
  moekd::cpu::RowsArgs args;
  args.teacher = in.teacher.data_ptr();
  args.teacher_dtype = kernel_dtype(in.teacher, "teacher_logits", true);
  args.teacher_level_stride = in.teacher.stride(0);
  args.teacher_row_stride = in.teacher.stride(1);
  return run_rows(in, args, temperatures, expert_strengths, level_weights, gate_weight, expert_weight,
                  ignore_index, num_threads, grad_scale, need_grad);
}

// A top-k teacher's tensors, checked against the student and put into args: indices
// (L, N, K) int64 (global classes), values (L, N, K), rest (L, N). Read through their
// strides; only rest (L·N floats) is converted, and returned to be kept alive.
at::Tensor set_top_k(moekd::cpu::RowsArgs& args, const at::Tensor& indices, const at::Tensor& values,
                     const at::Tensor& rest, int64_t num_rows) {
  using moekd::binding::shape_of;
  TORCH_CHECK(indices.device().is_cpu() && values.device().is_cpu() && rest.device().is_cpu(),
              "the cpu backend takes CPU tensors");
  TORCH_CHECK_VALUE(indices.dim() == 3, "top-k indices must be (L, N, K), got ", shape_of(indices));
  TORCH_CHECK_VALUE(values.sizes() == indices.sizes(), "top-k values must be shaped like the indices ",
                    shape_of(indices), ", got ", shape_of(values));
  TORCH_CHECK_VALUE(rest.dim() == 2 && rest.size(0) == indices.size(0) && rest.size(1) == indices.size(1),
                    "top-k rest must be (L, N) = (", indices.size(0), ", ", indices.size(1), "), got ",
                    shape_of(rest));
  TORCH_CHECK_TYPE(indices.scalar_type() == at::kLong, "top-k indices must be int64, got ",
                   indices.scalar_type());
  TORCH_CHECK_TYPE(rest.scalar_type() == at::kFloat || rest.scalar_type() == at::kDouble,
                   "top-k rest must be float32 or float64, got ", rest.scalar_type());
  const int64_t L = indices.size(0), N = indices.size(1);
  TORCH_CHECK_VALUE(N == num_rows, "top-k indices must have ", num_rows, " rows, got ", shape_of(indices));
  // One head at L levels keeps level stride 0: convert that one row of rests, not L.
  const bool shared = L > 1 && rest.stride(0) == 0;
  at::Tensor rest_f = shared ? rest.select(0, 0).to(at::kFloat).contiguous().unsqueeze(0).expand({L, N})
                             : rest.to(at::kFloat).contiguous();
  args.topk_indices = indices.data_ptr<int64_t>();
  args.topk_values = values.data_ptr();
  args.topk_values_dtype = kernel_dtype(values, "top-k values", true);
  args.topk_rest = rest_f.data_ptr<float>();
  args.topk_k = indices.size(2);
  for (int d = 0; d < 3; ++d) {
    args.topk_index_strides[d] = indices.stride(d);
    args.topk_value_strides[d] = values.stride(d);
  }
  args.topk_rest_strides[0] = rest_f.stride(0);
  args.topk_rest_strides[1] = rest_f.stride(1);
  return rest_f;
}

// check_row_inputs for a student whose teacher is top-k: the teacher it checks is a
// stand-in of shape (L, N, C) that is never read (C floats, class stride 1, so no copy).
moekd::binding::RowInputs check_top_k_row_inputs(const at::Tensor& student, const at::Tensor& indices,
                                                 const at::Tensor& target,
                                                 const std::vector<double>& temperatures,
                                                 const std::vector<double>& expert_strengths,
                                                 const std::vector<double>& level_weights) {
  const int64_t L = indices.dim() == 3 ? indices.size(0) : 1;
  const at::Tensor stand_in =
      student.dim() == 2 ? at::empty({student.size(1)}, student.options()).expand({L, student.size(0), student.size(1)})
                         : student;
  return moekd::binding::check_row_inputs(student, stand_in, target, temperatures, expert_strengths,
                                          level_weights, "cpu");
}

// A top-k teacher: the dense teacher row it stands for is rest with values at indices −
// class_offset (class_offset: the first class of this student's slice).
std::vector<at::Tensor> moe_kd_rows_topk(at::Tensor student, at::Tensor indices, at::Tensor values,
                                         at::Tensor rest, int64_t class_offset, at::Tensor target,
                                         std::vector<double> temperatures,
                                         std::vector<double> expert_strengths,
                                         std::vector<double> level_weights, double gate_weight,
                                         double expert_weight, int64_t ignore_index,
                                         int64_t num_threads, double grad_scale, bool need_grad) {
  TORCH_CHECK(student.device().is_cpu() && target.device().is_cpu(), "the cpu backend takes CPU tensors");
  const moekd::binding::RowInputs in =
      check_top_k_row_inputs(student, indices, target, temperatures, expert_strengths, level_weights);
  moekd::cpu::RowsArgs args;
  const at::Tensor rest_f = set_top_k(args, indices, values, rest, in.N);
  args.class_offset = class_offset;
  return run_rows(in, args, temperatures, expert_strengths, level_weights, gate_weight, expert_weight,
                  ignore_index, num_threads, grad_scale, need_grad);
}

// One phase over a class slice (moekd_cpu.h, Phase): the teacher is dense (teacher given)
// or top-k (indices, values, rest given); row_in is the phase's (rows, N) input. Returns
// the phase's (rows, N) float32 output, or for the gradient phase the (N, C_r) gradient.
at::Tensor moe_kd_phase(int64_t phase, at::Tensor student, c10::optional<at::Tensor> teacher,
                        c10::optional<at::Tensor> indices, c10::optional<at::Tensor> values,
                        c10::optional<at::Tensor> rest, int64_t class_offset, at::Tensor target,
                        c10::optional<at::Tensor> row_in, std::vector<double> temperatures,
                        std::vector<double> expert_strengths, std::vector<double> level_weights,
                        double gate_weight, double expert_weight, int64_t ignore_index,
                        int64_t num_threads, double grad_scale) {
  TORCH_CHECK_VALUE(phase >= 0 && phase <= 3, "phase must be 0 to 3, got ", phase);
  TORCH_CHECK(student.device().is_cpu() && target.device().is_cpu(), "the cpu backend takes CPU tensors");
  const bool top_k = !teacher.has_value();
  TORCH_CHECK_VALUE(top_k == (indices.has_value() && values.has_value() && rest.has_value()),
                    "give either teacher or (indices, values, rest)");
  moekd::cpu::RowsArgs args;
  at::Tensor rest_f;
  moekd::binding::RowInputs in;
  if (top_k) {
    in = check_top_k_row_inputs(student, *indices, target, temperatures, expert_strengths, level_weights);
    rest_f = set_top_k(args, *indices, *values, *rest, in.N);
  } else {
    TORCH_CHECK(teacher->device().is_cpu(), "the cpu backend takes CPU tensors");
    in = moekd::binding::check_row_inputs(student, *teacher, target, temperatures, expert_strengths,
                                          level_weights, "cpu");
    args.teacher = in.teacher.data_ptr();
    args.teacher_dtype = kernel_dtype(in.teacher, "teacher_logits", true);
    args.teacher_level_stride = in.teacher.stride(0);
    args.teacher_row_stride = in.teacher.stride(1);
  }
  const auto kind = static_cast<moekd::cpu::Phase>(phase);
  const int64_t L = in.L, N = in.N;
  const int64_t in_rows[] = {0, 1 + L, 2 + 2 * L, 4 + 3 * L};
  const int64_t out_rows[] = {1 + L, 1 + 2 * L, 3 + 3 * L, 0};
  at::Tensor input;
  if (in_rows[phase] > 0) {
    TORCH_CHECK_VALUE(row_in.has_value() && row_in->dim() == 2 && row_in->size(0) == in_rows[phase] &&
                          row_in->size(1) == N,
                      "phase ", phase, " takes row inputs of shape (", in_rows[phase], ", ", N, ")");
    input = row_in->to(at::kFloat).contiguous();
  }
  args.num_rows = N;
  args.num_classes = in.C;
  args.student = in.student.data_ptr();
  args.student_dtype = kernel_dtype(in.student, "student_logits", false);
  args.student_row_stride = in.student.stride(0);
  args.target = in.target.data_ptr<int64_t>();
  args.class_offset = class_offset;
  args.grad_scale = static_cast<float>(grad_scale);
  at::Tensor out;
  if (kind == moekd::cpu::Phase::kGradient) {
    out = at::empty({N, in.C}, in.student.options().memory_format(at::MemoryFormat::Contiguous));
    advise_huge_pages(out.data_ptr(), out.nbytes());
    args.grad = out.data_ptr();
  } else {
    out = at::empty({out_rows[phase], N}, in.student.options().dtype(at::kFloat));
  }
  moekd::cpu::PhaseArgs pa;
  pa.rows = args;
  pa.row_in = input.defined() ? input.data_ptr<float>() : nullptr;
  pa.row_out = kind == moekd::cpu::Phase::kGradient ? nullptr : out.data_ptr<float>();
  const moekd::Params params =
      moekd::make_params(static_cast<int>(L), temperatures.data(), expert_strengths.data(),
                         level_weights.data(), gate_weight, expert_weight, ignore_index);
  {
    pybind11::gil_scoped_release no_gil;
    moekd::cpu::moe_kd_phase(kind, pa, params,
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
  m.def("moe_kd_rows_topk", &moe_kd_rows_topk,
        "(student (N,C), indices (L,N,K) int64, values (L,N,K), rest (L,N), class_offset, target (N,), "
        "the options as moe_kd_rows) -> as moe_kd_rows, for the dense teacher row rest with values at "
        "indices - class_offset");
  m.def("moe_kd_phase", &moe_kd_phase,
        "(phase 0-3, student (N,C_r), teacher (L,N,C_r) or None, indices, values, rest (or None), "
        "class_offset, target (N,), row_in (rows,N) or None, the options, num_threads, grad_scale) -> "
        "the phase's (rows, N) float32 output, or the (N, C_r) gradient for phase 3");
  m.def("exp_for_test", &moekd::cpu::exp_for_test, "the kernel's exp, for accuracy tests");
  m.def("log_for_test", &moekd::cpu::log_for_test, "the kernel's log (x >= 1), for accuracy tests");
}
