// Test driver: runs the CUDA kernel's per-thread code (moekd_row.h) on the CPU.
//
// Not part of the extension. tests/test_cuda_backend.py builds it with g++ (under
// AddressSanitizer where available) and feeds it rows: every virtual thread of a
// row's group (K blocks of `threads` threads, each block with its own cache and
// LevelConsts copy) runs the same functions the kernel runs, in the kernel's order,
// with the group reductions done as plain folds. That checks the row layout, the
// chunk/slot indexing, the caches, the special rows and the math; the warp
// shuffles, barriers and cluster exchange are the GPU's part alone.
//
// Usage: host_emulation IN OUT. IN (little-endian):
//   int64[18]: N C L student_dtype teacher_dtype threads K use_cache
//              student_row_stride teacher_level_stride teacher_row_stride
//              student_offset teacher_offset grad_offset ignore_index prefetch has_grad_scale
//              need_grad
//              (dtypes: 0 float32, 1 bfloat16, 2 float16; offsets in elements; a teacher
//              level stride of 0 is one teacher row shared by every level)
//   float64[3L + 3]: temperatures, expert strengths, level weights, gate weight, expert weight,
//              grad scale (passed to the kernel code as a float pointer if has_grad_scale,
//              else as nullptr)
//   student buffer: student_offset + (N-1)*student_row_stride + C elements
//   teacher buffer: teacher_offset + (L-1)*teacher_level_stride + (N-1)*teacher_row_stride + C elements
//   int64[N] target
// OUT: float32[N] loss, float32[N] log_likelihood, float32[N] agreement, then N*C grad
//      elements if need_grad. Without need_grad no gradient buffer exists: the kernel
//      code gets the stand-in address the kernel gets (no_grad_base), and any write
//      through it faults.
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <new>
#include <vector>

#include "cuda/moekd_row.h"

using namespace moekd::cuda_row;

namespace {

[[noreturn]] void die(const char* what) {
  fprintf(stderr, "host_emulation: %s\n", what);
  exit(2);
}

// Buffers allocated to the exact byte (so AddressSanitizer flags any overrun),
// 64-byte aligned so that the offsets alone decide the row alignment.
struct Buffer {
  unsigned char* data = nullptr;
  size_t size = 0;
  explicit Buffer(size_t n) : size(n) {
    data = static_cast<unsigned char*>(::operator new(n ? n : 1, std::align_val_t(64)));
  }
  ~Buffer() { ::operator delete(data, std::align_val_t(64)); }
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
};

void read_exact(FILE* f, void* dst, size_t n) {
  if (fread(dst, 1, n, f) != n) die("short input");
}

size_t elem_size(long long dtype) { return dtype == 0 ? 4 : 2; }

struct Job {
  long long N, C, L, sd, td, threads, K, use_cache, s_stride, t_lstride, t_rstride, s_off, t_off, g_off,
      ignore_index, prefetch, need_grad;
  moekd::Params params;
  const float* grad_scale;  // nullptr or a heap float (so ASan sees the one-element read)
  Buffer* student;
  Buffer* teacher;
  std::vector<long long> target;
  std::vector<float> loss, ll, agreement;
  Buffer* grad;  // g_off sentinel elements, then N*C; nullptr without need_grad
};

template <class TS, class TT>
void run(Job& job) {
  const KernelConsts kc = make_kernel_consts(job.params);
  const int C = static_cast<int>(job.C), L = static_cast<int>(job.L);
  const int K = static_cast<int>(job.K), threads = static_cast<int>(job.threads), G = K * threads;
  const int vpc = Elem<TS>::kVecs + L * Elem<TT>::kVecs;
  // As the host plan sizes it: enough slots for the most chunks any layout has.
  const int slots = job.use_cache ? (C / kChunk + G - 1) / G : 0;
  std::vector<std::vector<Vec16>> caches(K, std::vector<Vec16>(static_cast<size_t>(slots) * threads * vpc + 1));
  std::vector<std::vector<LevelConsts>> lcs(K, std::vector<LevelConsts>(moekd::kMaxLevels));

  const TS* student = reinterpret_cast<const TS*>(job.student->data) + job.s_off;
  const TT* teacher = reinterpret_cast<const TT*>(job.teacher->data) + job.t_off;
  // As the launcher passes it: a stand-in address when there is no gradient.
  TS* grad = job.grad != nullptr ? reinterpret_cast<TS*>(job.grad->data) + job.g_off
                                 : static_cast<TS*>(no_grad_base());

  for (long long row = 0; row < job.N; ++row) {
    std::vector<RowCtx<TS, TT>> ctx(G);
    for (int g = 0; g < G; ++g) {
      const int rank = g / threads, tid = g % threads;
      RowCtx<TS, TT>& r = ctx[g];
      r.s = student + row * job.s_stride;
      r.t = teacher + row * job.t_rstride;
      r.t_level_stride = job.t_lstride;
      r.g = grad + row * job.C;
      r.C = C;
      r.L = L;
      r.gi = g;
      r.G = G;
      r.cache = job.use_cache ? caches[rank].data() : nullptr;
      r.cache_tid = tid;
      r.cache_width = threads;
      r.cache_slots = slots;
      r.prefetched = false;
      r.lc = lcs[rank].data();
      plan_layout(r);
      if (job.use_cache && (r.nchunks + G - 1) / G > slots) die("cache too small for the layout");
    }
    const long long y = job.target[row];
    const int kind = row_kind(y, C, job.ignore_index);
    for (auto& r : ctx) r.y = kind == 0 ? static_cast<int>(y) : 0;
    if (kind != 0) {
      const float value = kind == 1 ? 0.0f : bits_to_float(0x7fc00000u);
      if (job.need_grad)
        for (auto& r : ctx) fill_grad(r, value);
      job.loss[row] = job.ll[row] = job.agreement[row] = value;
      continue;
    }
    // Poison what the leader has not written yet, and the caches (the last row's data):
    // a read before the write shows as NaN.
    for (auto& lc : lcs)
      for (auto& c : lc) memset(&c, 0xff, sizeof c);
    for (auto& cache : caches) memset(cache.data(), 0xff, cache.size() * sizeof(Vec16));
    if (job.prefetch && job.use_cache) {
      for (auto& r : ctx) {
        prefetch_row(r);
        r.prefetched = true;
      }
    }
    for (auto& lc : lcs) leader_init_levels(lc.data(), kc);

    std::vector<float> s_max_thread(G, -INFINITY);
    RowConsts rc{};
    for (int l = 0; l < L; ++l) {
      Pass1Level merged = pass1_identity();
      for (int g = 0; g < G; ++g) {
        const Pass1Level st = pass1_level(ctx[g], l, s_max_thread[g]);
        pass1_merge(merged, st, lcs[0][l].k2);
      }
      if (l == 0) rc = row_consts(merged, Elem<TS>::to_float(ctx[0].s[ctx[0].y]));
      for (auto& lc : lcs) publish_pass1(lc.data(), l, merged);
    }
    for (int l = 0; l < L; ++l) {
      LevelSums merged = level_sums_identity();
      for (int g = 0; g < G; ++g) level_sums_merge(merged, pass2_level(ctx[g], rc, l));
      add_level_totals(rc, merged);
      for (auto& lc : lcs) publish_pass2(lc.data(), l, merged);
    }
    const moekd::RowResult res = finalize_stats(lcs[0].data(), rc, kc.p);
    job.loss[row] = finalize_loss(lcs[0].data(), rc, kc.p);
    job.ll[row] = res.log_likelihood;
    job.agreement[row] = res.agreement;
    if (!job.need_grad) continue;
    for (auto& lc : lcs) publish_R(lc.data(), res, L);
    const float w = read_grad_scale(job.grad_scale);
    for (int g = 0; g < G; ++g) pass3(ctx[g], kc.p, rc, res, w);
    for (int g = 0; g < G; ++g)
      if (owns_class(ctx[g], ctx[g].y)) fix_target_gradient(ctx[g], kc.p, rc, res, w);
  }
}

template <class TS>
void run_teacher(Job& job) {
  switch (job.td) {
    case 0: return run<TS, float>(job);
    case 1: return run<TS, bf16_t>(job);
    case 2: return run<TS, fp16_t>(job);
  }
  die("bad teacher dtype");
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 3) die("usage: host_emulation IN OUT");
  FILE* in = fopen(argv[1], "rb");
  if (!in) die("cannot open input");
  long long h[18];
  read_exact(in, h, sizeof h);
  Job job;
  job.N = h[0];
  job.C = h[1];
  job.L = h[2];
  job.sd = h[3];
  job.td = h[4];
  job.threads = h[5];
  job.K = h[6];
  job.use_cache = h[7];
  job.s_stride = h[8];
  job.t_lstride = h[9];
  job.t_rstride = h[10];
  job.s_off = h[11];
  job.t_off = h[12];
  job.g_off = h[13];
  job.ignore_index = h[14];
  job.prefetch = h[15];
  const bool has_grad_scale = h[16] != 0;
  job.need_grad = h[17];
  if (job.L < 1 || job.L > moekd::kMaxLevels || job.C < 1 || job.N < 1) die("bad sizes");
  std::vector<double> opts(3 * job.L + 3);
  read_exact(in, opts.data(), opts.size() * sizeof(double));
  job.params = moekd::make_params(static_cast<int>(job.L), opts.data(), opts.data() + job.L,
                                  opts.data() + 2 * job.L, opts[3 * job.L], opts[3 * job.L + 1], job.ignore_index);
  std::vector<float> grad_scale(1, static_cast<float>(opts[3 * job.L + 2]));
  job.grad_scale = has_grad_scale ? grad_scale.data() : nullptr;
  const size_t s_len = job.s_off + (job.N - 1) * job.s_stride + job.C;
  const size_t t_len = job.t_off + (job.L - 1) * job.t_lstride + (job.N - 1) * job.t_rstride + job.C;
  Buffer student(s_len * elem_size(job.sd)), teacher(t_len * elem_size(job.td));
  read_exact(in, student.data, student.size);
  read_exact(in, teacher.data, teacher.size);
  job.target.resize(job.N);
  read_exact(in, job.target.data(), job.N * sizeof(long long));
  fclose(in);

  const size_t g_len = job.need_grad ? job.g_off + job.N * job.C : 0;
  Buffer grad(g_len * elem_size(job.sd));
  memset(grad.data, 0x7f, grad.size);  // sentinel: every element must be overwritten
  job.student = &student;
  job.teacher = &teacher;
  job.grad = job.need_grad ? &grad : nullptr;
  job.loss.assign(job.N, 0.0f);
  job.ll.assign(job.N, 0.0f);
  job.agreement.assign(job.N, 0.0f);

  switch (job.sd) {
    case 0: run_teacher<float>(job); break;
    case 1: run_teacher<bf16_t>(job); break;
    case 2: run_teacher<fp16_t>(job); break;
    default: die("bad student dtype");
  }

  for (size_t i = 0; job.need_grad && i < job.g_off * elem_size(job.sd); ++i)
    if (grad.data[i] != 0x7f) die("wrote before the gradient's first element");

  FILE* out = fopen(argv[2], "wb");
  if (!out) die("cannot open output");
  fwrite(job.loss.data(), sizeof(float), job.N, out);
  fwrite(job.ll.data(), sizeof(float), job.N, out);
  fwrite(job.agreement.data(), sizeof(float), job.N, out);
  if (job.need_grad) fwrite(grad.data + job.g_off * elem_size(job.sd), elem_size(job.sd), job.N * job.C, out);
  fclose(out);
  return 0;
}
