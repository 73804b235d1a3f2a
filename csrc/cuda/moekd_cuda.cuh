// The fused MoE-KD kernel: group reductions and the kernel body. The per-thread
// passes live in moekd_row.h (host-callable, so they are tested on the CPU).
//
// A row belongs to one group of threads:
//   warp rows:  a warp, several rows per block (small C); warp shuffles only.
//   block rows: all threads of a block, or of a cluster of K blocks (sm_90) so
//               that a row too large for one block's shared memory is still read
//               from global memory once. Warp shuffles, then one shared-memory
//               exchange per block, then (K > 1) one exchange through distributed
//               shared memory.
// Each reduction is an all-reduce: every thread ends with the same bits, because
// both merges are commutative to the bit and every warp combines the same
// partials in the same order. So no result has to be broadcast afterwards.
#pragma once

#include <cooperative_groups.h>

#include "cuda/moekd_row.h"

namespace moekd {
namespace cuda_kernel {

using namespace moekd::cuda_row;
namespace cg = cooperative_groups;

struct KernelArgs {
  const void* student;
  const void* teacher;
  const long long* target;
  float* loss;
  float* log_likelihood;
  float* agreement;
  void* grad;                 // no_grad_base() when need_grad is 0
  const float* grad_scale;    // device scalar multiplying the gradient; nullptr = 1
  long long num_rows;
  long long student_row_stride;
  long long teacher_level_stride;
  long long teacher_row_stride;
  int num_classes;
  int cluster_size;           // blocks per row (block rows); 1 without a cluster launch
  int use_cache;              // keep each thread's chunks in shared memory
  int prefetch;               // with the cache: fill it with async copies before pass 1
  int need_grad;              // 0: no pass 3 and no gradient writes (loss and stats unchanged)
  int cache_slots;            // chunks per thread the cache holds
  long long group_cache_vecs; // Vec16 per row group (warp rows: per warp)
  KernelConsts kc;
};

// Threads per block: 256 at most, and registers capped so that 3 such blocks fit
// an SM (<= 80 per thread; the passes need about that much without spilling).
constexpr int kWarpRowsThreads = 256;
constexpr int kMaxBlockThreads = 256;
constexpr int kMinBlocksPerSM = 3;

__device__ __forceinline__ float shfl_xor(float v, int mask) {
  return __shfl_xor_sync(0xffffffffu, v, mask);
}

// Pass-1 sums of one level: merged with rescaling (moekd_row.h pass1_merge).
struct Pass1Ops {
  using State = Pass1Level;
  float k2;
  __device__ __forceinline__ State identity() const { return pass1_identity(); }
  __device__ __forceinline__ State shfl(const State& a, int mask) const {
    return {shfl_xor(a.s_max, mask), shfl_xor(a.s_sum, mask), shfl_xor(a.q_sum, mask),
            shfl_xor(a.t_max, mask), shfl_xor(a.t_sum, mask)};
  }
  __device__ __forceinline__ void merge(State& a, const State& b) const { pass1_merge(a, b, k2); }
};

// Pass-2 sums of one level: plain addition.
struct SumOps {
  using State = LevelSums;
  __device__ __forceinline__ State identity() const { return level_sums_identity(); }
  __device__ __forceinline__ State shfl(const State& a, int mask) const {
    return {shfl_xor(a.u_rest, mask), shfl_xor(a.u_target, mask), shfl_xor(a.u_over_D, mask),
            shfl_xor(a.u_log_D_rest, mask), shfl_xor(a.u_log_q, mask)};
  }
  __device__ __forceinline__ void merge(State& a, const State& b) const { level_sums_merge(a, b); }
};

// Butterfly over the 32 lanes; all lanes must be present (rows are warp-uniform).
template <class Ops>
__device__ __forceinline__ typename Ops::State warp_allreduce(typename Ops::State v, const Ops& ops) {
  MOEKD_UNROLL
  for (int mask = 16; mask >= 1; mask >>= 1) ops.merge(v, ops.shfl(v, mask));
  return v;
}

// All threads of the block; blockDim.x is a multiple of 32. The trailing barrier
// lets the next call (next level) rewrite `slots`.
template <class Ops>
__device__ __forceinline__ typename Ops::State block_allreduce(typename Ops::State v, const Ops& ops) {
  using State = typename Ops::State;
  __shared__ State slots[32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, num_warps = blockDim.x >> 5;
  v = warp_allreduce(v, ops);
  if (lane == 0) slots[warp] = v;
  __syncthreads();
  v = warp_allreduce(lane < num_warps ? slots[lane] : ops.identity(), ops);
  __syncthreads();
  return v;
}

// The K blocks of this block's cluster (sm_90); v is this block's total, the same in
// all its threads. The first cluster barrier publishes every block's slot, the second
// keeps a block from rewriting (next call) or releasing (exit) its slot while another
// block may still read it.
template <class Ops>
__device__ __forceinline__ typename Ops::State cluster_allreduce(typename Ops::State v, const Ops& ops,
                                                               int K) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  using State = typename Ops::State;
  __shared__ State slot;
  if (threadIdx.x == 0) slot = v;
  cg::cluster_group cluster = cg::this_cluster();
  cluster.sync();
  const int lane = threadIdx.x & 31;
  State mine = ops.identity();
  if (lane < K) mine = *cluster.map_shared_rank(&slot, lane);
  v = warp_allreduce(mine, ops);
  cluster.sync();
  return v;
#else
  __trap();  // the host launches clusters only on sm_90+
  return v;
#endif
}

template <bool kWarpRows, class Ops>
__device__ __forceinline__ typename Ops::State group_allreduce(typename Ops::State v, const Ops& ops, int K) {
  if constexpr (kWarpRows) {
    return warp_allreduce(v, ops);
  } else {
    v = block_allreduce(v, ops);
    if (K > 1) v = cluster_allreduce(v, ops, K);
    return v;
  }
}

// Orders the leader's LevelConsts writes before the group's reads. Each block of a
// cluster keeps its own copy, so a block barrier is enough there.
template <bool kWarpRows>
__device__ __forceinline__ void group_sync() {
  if constexpr (kWarpRows) __syncwarp();
  else __syncthreads();
}

__device__ __forceinline__ int cluster_rank() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  return static_cast<int>(cg::this_cluster().block_rank());
#else
  return 0;
#endif
}

template <class TS, class TT, bool kWarpRows>
__global__ void __launch_bounds__(kWarpRows ? kWarpRowsThreads : kMaxBlockThreads, kMinBlocksPerSM)
moe_kd_kernel(const __grid_constant__ KernelArgs a) {
  extern __shared__ Vec16 smem_cache[];
  constexpr int kGroups = kWarpRows ? kWarpRowsThreads / 32 : 1;
  __shared__ LevelConsts level_consts[kGroups][kMaxLevels];

  RowCtx<TS, TT> r;
  long long row;
  int K = 1;
  bool leader;
  r.cache = nullptr;
  r.prefetched = false;
  if constexpr (kWarpRows) {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    row = static_cast<long long>(blockIdx.x) * kGroups + warp;
    if (row >= a.num_rows) return;  // the whole warp; warp rows use no block barrier
    r.gi = lane;
    r.G = 32;
    r.cache_tid = lane;
    r.cache_width = 32;
    if (a.use_cache) r.cache = smem_cache + warp * a.group_cache_vecs;
    r.lc = level_consts[warp];
    leader = lane == 0;
  } else {
    K = a.cluster_size;
    const int rank = K > 1 ? cluster_rank() : 0;
    row = blockIdx.x / K;  // grid = num_rows * K blocks, clusters of K consecutive blocks
    r.gi = rank * static_cast<int>(blockDim.x) + static_cast<int>(threadIdx.x);
    r.G = K * static_cast<int>(blockDim.x);
    r.cache_tid = threadIdx.x;
    r.cache_width = blockDim.x;
    if (a.use_cache) r.cache = smem_cache;
    r.lc = level_consts[0];
    leader = threadIdx.x == 0;  // one per block: each block of a cluster has its own copy
  }
  r.C = a.num_classes;
  r.L = a.kc.p.num_levels;
  r.s = static_cast<const TS*>(a.student) + row * a.student_row_stride;
  r.t = static_cast<const TT*>(a.teacher) + row * a.teacher_row_stride;
  r.t_level_stride = a.teacher_level_stride;
  r.g = static_cast<TS*>(a.grad) + row * static_cast<long long>(a.num_classes);
  r.cache_slots = a.cache_slots;
  plan_layout(r);

  const long long y = a.target[row];
  const int kind = row_kind(y, r.C, a.kc.p.ignore_index);
  r.y = kind == 0 ? static_cast<int>(y) : 0;

  if (kind != 0) {  // the same for the whole group: the row's target decides
    const float value = kind == 1 ? 0.0f : bits_to_float(0x7fc00000u);
    if (a.need_grad) fill_grad(r, value);
    if (r.gi == 0) {
      a.loss[row] = value;
      a.log_likelihood[row] = value;
      a.agreement[row] = value;
    }
    return;  // no reduction or barrier follows
  }

  if (a.prefetch && r.cache != nullptr) {
    prefetch_row(r);
    r.prefetched = true;
  }
  if (leader) leader_init_levels(r.lc, a.kc);
  group_sync<kWarpRows>();

  float s_max_thread = -INFINITY;
  RowConsts rc;
  for (int l = 0; l < r.L; ++l) {
    Pass1Level st = pass1_level(r, l, s_max_thread);
    st = group_allreduce<kWarpRows>(st, Pass1Ops{r.lc[l].k2}, K);
    if (l == 0) rc = row_consts(st, Elem<TS>::to_float(r.s[r.y]));
    if (leader) publish_pass1(r.lc, l, st);
  }
  group_sync<kWarpRows>();

  for (int l = 0; l < r.L; ++l) {
    LevelSums ls = pass2_level(r, rc, l);
    ls = group_allreduce<kWarpRows>(ls, SumOps{}, K);
    add_level_totals(rc, ls);
    if (leader) publish_pass2(r.lc, l, ls);
  }
  group_sync<kWarpRows>();

  const RowResult res = finalize_stats(r.lc, rc, a.kc.p);
  if (r.gi == 0) {
    a.loss[row] = finalize_loss(r.lc, rc, a.kc.p);
    a.log_likelihood[row] = res.log_likelihood;
    a.agreement[row] = res.agreement;
  }
  if (!a.need_grad) return;  // the same for every thread: no barrier is left waiting
  if (leader) publish_R(r.lc, res, r.L);
  group_sync<kWarpRows>();

  const float w = read_grad_scale(a.grad_scale);
  pass3(r, a.kc.p, rc, res, w);
  if (owns_class(r, r.y)) fix_target_gradient(r, a.kc.p, rc, res, w);
}

}  // namespace cuda_kernel
}  // namespace moekd
