// Host entry points of the CUDA kernel. Plain C++ (no CUDA or PyTorch headers), so
// the PyTorch binding can include it with a CPU-only toolchain.
#pragma once

#include <stddef.h>

#include "common/moekd_math.h"

namespace moekd_cuda {

enum DType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

// How rows map onto the GPU. kAuto picks from C, L and the dtypes; the others force
// one strategy (tests and benchmarks) and fail with a message where it cannot run.
enum Path : int {
  kAuto = 0,
  kWarpRows = 1,   // a warp per row, several rows per block (small C)
  kBlockRow = 2,   // a block per row, the row cached in shared memory (streamed if it does not fit)
  kClusterRow = 3, // a cluster of 2..16 blocks per row (sm_90+), each caching a share of the row
  kStreamRow = 4,  // a block per row, no cache: passes 2 and 3 read global memory again
};

struct LaunchArgs {
  const void* student;                 // (N, C), element stride 1
  long long student_row_stride;        // elements
  DType student_dtype;
  const void* teacher;                 // (L, N, C), element stride 1
  long long teacher_level_stride;      // elements
  long long teacher_row_stride;        // elements
  DType teacher_dtype;
  const long long* target;             // (N,) int64, contiguous
  float* loss;                         // (N,) contiguous
  float* log_likelihood;               // (N,)
  float* agreement;                    // (N,)
  void* grad;                          // (N, C) contiguous, student dtype; nullptr: no gradient
                                       // pass (loss and stats bit-identical)
  const float* grad_scale;             // device scalar w: grad = w · ∂loss/∂s; nullptr = 1
  long long num_rows;
  long long num_classes;
  moekd::Params params;                // params.num_levels = L <= moekd::kMaxLevels
  int path;                            // Path
  int prefetch;                        // 1: cached paths load the row with async copies before pass 1
  int device;                          // CUDA device of the tensors
  void* stream;                        // cudaStream_t
};

// Launches the kernel. Returns nullptr on success, else an error message that
// stays valid until the next call on this thread.
const char* launch(const LaunchArgs& args);

// The launch plan for these sizes on `device`, e.g. "cluster x8 of 256 threads,
// shared-memory cache 65536 B/block", written into buf. Same return convention.
const char* describe_plan(int device, long long num_classes, int num_levels, DType student_dtype,
                          DType teacher_dtype, int path, char* buf, size_t buf_size);

}  // namespace moekd_cuda
