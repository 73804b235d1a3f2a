// PyTorch binding of the CUDA kernel: checks, allocates the outputs, launches.
//
// Only torch/extension.h: no CUDA headers, so this file also compiles against a
// CPU-only PyTorch (the test suite checks it with -fsyntax-only). The stream
// comes from Python as an integer (torch.cuda.current_stream().cuda_stream).
#include <torch/extension.h>

#include <optional>
#include <string>
#include <vector>

#include "common/binding_inputs.h"
#include "cuda/moekd_cuda.h"

namespace {

moekd_cuda::DType to_dtype(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return moekd_cuda::kFloat32;
    case at::kBFloat16: return moekd_cuda::kBFloat16;
    case at::kHalf: return moekd_cuda::kFloat16;
    default: break;
  }
  TORCH_CHECK_TYPE(false, name, " must be float32, bfloat16 or float16 for the cuda backend, got ",
                   t.scalar_type());
  return moekd_cuda::kFloat32;
}

std::vector<at::Tensor> forward(at::Tensor student, at::Tensor teacher, at::Tensor target,
                                std::vector<double> temperatures, std::vector<double> expert_strengths,
                                std::vector<double> level_weights, double gate_weight, double expert_weight,
                                int64_t ignore_index, int64_t stream, int64_t path, int64_t prefetch,
                                std::optional<at::Tensor> grad_scale, bool need_grad) {
  TORCH_CHECK(student.is_cuda() && teacher.is_cuda() && target.is_cuda(), "the cuda backend needs CUDA tensors");
  TORCH_CHECK(teacher.device() == student.device() && target.device() == student.device(),
              "student_logits, teacher_logits and target must be on one device");
  const moekd::binding::RowInputs in = moekd::binding::check_row_inputs(
      student, teacher, target, temperatures, expert_strengths, level_weights, "cuda");
  const int64_t N = in.N, C = in.C;
  TORCH_CHECK_VALUE(C >= 1 && C < (int64_t{1} << 31), "C must be in [1, 2^31), got ", C);
  // Read by the kernel, never here: a host read would synchronise with the device.
  const bool scaled = grad_scale.has_value() && grad_scale->defined();
  if (scaled) {
    TORCH_CHECK_TYPE(grad_scale->scalar_type() == at::kFloat, "grad_scale must be float32 for the cuda backend, got ",
                     grad_scale->scalar_type());
    TORCH_CHECK_VALUE(grad_scale->numel() == 1, "grad_scale must hold one value, got shape ",
                      moekd::binding::shape_of(*grad_scale));
    TORCH_CHECK(grad_scale->device() == student.device(), "grad_scale must be on the student's device (",
                student.device(), "), got ", grad_scale->device());
  }
  const moekd_cuda::DType student_dtype = to_dtype(in.student, "student_logits");
  const moekd_cuda::DType teacher_dtype = to_dtype(in.teacher, "teacher_logits");
  std::vector<at::Tensor> out = moekd::binding::allocate_outputs(in, need_grad);
  if (N == 0) return out;
  const at::Tensor &loss = out[0], &log_likelihood = out[1], &agreement = out[2], &grad = out[3];

  moekd_cuda::LaunchArgs args{};
  args.student = in.student.data_ptr();
  args.student_row_stride = in.student.stride(0);
  args.student_dtype = student_dtype;
  args.teacher = in.teacher.data_ptr();
  args.teacher_level_stride = in.teacher.stride(0);
  args.teacher_row_stride = in.teacher.stride(1);
  args.teacher_dtype = teacher_dtype;
  args.target = reinterpret_cast<const long long*>(in.target.data_ptr<int64_t>());
  args.loss = loss.data_ptr<float>();
  args.log_likelihood = log_likelihood.data_ptr<float>();
  args.agreement = agreement.data_ptr<float>();
  args.grad = need_grad ? grad.data_ptr() : nullptr;
  args.grad_scale = scaled ? grad_scale->data_ptr<float>() : nullptr;
  args.num_rows = N;
  args.num_classes = C;
  args.params = moekd::make_params(static_cast<int>(in.L), temperatures.data(), expert_strengths.data(),
                                   level_weights.data(), gate_weight, expert_weight, ignore_index);
  args.path = static_cast<int>(path);
  args.prefetch = prefetch != 0 ? 1 : 0;
  args.device = student.get_device();
  args.stream = reinterpret_cast<void*>(static_cast<intptr_t>(stream));
  const char* error = moekd_cuda::launch(args);
  TORCH_CHECK(error == nullptr, error ? error : "");
  return out;
}

moekd_cuda::DType dtype_from_name(const std::string& name) {
  if (name == "float32") return moekd_cuda::kFloat32;
  if (name == "bfloat16") return moekd_cuda::kBFloat16;
  if (name == "float16") return moekd_cuda::kFloat16;
  TORCH_CHECK_VALUE(false, "dtype must be float32, bfloat16 or float16, got ", name);
  return moekd_cuda::kFloat32;
}

std::string describe_plan(int64_t device, int64_t num_classes, int64_t num_levels, const std::string& student,
                          const std::string& teacher, int64_t path) {
  char buf[512];
  const char* error =
      moekd_cuda::describe_plan(static_cast<int>(device), num_classes, static_cast<int>(num_levels),
                                dtype_from_name(student), dtype_from_name(teacher), static_cast<int>(path), buf,
                                sizeof buf);
  TORCH_CHECK(error == nullptr, error ? error : "");
  return buf;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward, "MoE-KD rows on CUDA: (loss, log_likelihood, agreement, grad or None)");
  m.def("describe_plan", &describe_plan, "the launch plan for (device, C, L, student, teacher dtype, path)");
}
