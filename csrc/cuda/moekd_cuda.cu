// Kernel instantiations, launch planning and the launcher (moekd_cuda.h).
#include <cuda_runtime.h>

#include <mutex>
#include <set>
#include <stdio.h>
#include <string>
#include <tuple>
#include <utility>

#include "cuda/moekd_cuda.cuh"
#include "cuda/moekd_cuda.h"

namespace moekd_cuda {
namespace {

using moekd::cuda_kernel::KernelArgs;
using moekd::cuda_kernel::kWarpRowsThreads;
using moekd::cuda_kernel::kMaxBlockThreads;
using moekd::cuda_kernel::moe_kd_kernel;
using moekd::cuda_row::bf16_t;
using moekd::cuda_row::fp16_t;
using moekd::cuda_row::kChunk;
using moekd::cuda_row::Vec16;

// Shared-memory cache budgets. 96 KB per block leaves room for two blocks per SM
// (228 KB), so one block's loads overlap another's math.
constexpr long long kWarpCacheBudget = 64 * 1024;   // per block of 8 warp rows
constexpr long long kBlockCacheBudget = 96 * 1024;  // per block
constexpr long long kClusterBudgetMax = 160 * 1024; // per block at cluster size 8
constexpr int kPortableClusterBlocks = 8;           // the cluster size every sm_90+ device schedules
constexpr int kMaxClusterBlocks = 16;               // non-portable (H100); tried first, 8 as the fallback
constexpr int kAutoMaxClusterBlocks = 4;            // auto: longer rows stream (measured, see make_plan)
constexpr long long kWarpRowsMaxClasses = 1024;     // auto: warp rows up to this C
constexpr int kChunksPerThread = 4;                 // cached paths: chunks each thread keeps, at least
constexpr int kCachedMaxThreads = 256;              // cached paths: 2-3 blocks of ~80 registers per SM

thread_local std::string g_error;

const char* fail(std::string message) {
  g_error = std::move(message);
  return g_error.c_str();
}

int vecs_per_chunk(DType d) { return d == kFloat32 ? 2 : 1; }

const char* dtype_name(DType d) {
  switch (d) {
    case kFloat32: return "float32";
    case kBFloat16: return "bfloat16";
    case kFloat16: return "float16";
  }
  return "?";
}

template <class TS, class TT>
const void* kernel_for(bool warp_rows) {
  return warp_rows ? reinterpret_cast<const void*>(&moe_kd_kernel<TS, TT, true>)
                   : reinterpret_cast<const void*>(&moe_kd_kernel<TS, TT, false>);
}

template <class TS>
const void* kernel_for_teacher(DType teacher, bool warp_rows) {
  switch (teacher) {
    case kFloat32: return kernel_for<TS, float>(warp_rows);
    case kBFloat16: return kernel_for<TS, bf16_t>(warp_rows);
    case kFloat16: return kernel_for<TS, fp16_t>(warp_rows);
  }
  return nullptr;
}

const void* kernel_for_dtypes(DType student, DType teacher, bool warp_rows) {
  switch (student) {
    case kFloat32: return kernel_for_teacher<float>(teacher, warp_rows);
    case kBFloat16: return kernel_for_teacher<bf16_t>(teacher, warp_rows);
    case kFloat16: return kernel_for_teacher<fp16_t>(teacher, warp_rows);
  }
  return nullptr;
}

struct DeviceInfo {
  int cc_major = 0;
  int sm_count = 0;
  long long smem_optin = 0;  // largest shared memory one block may opt in to
};

std::mutex g_mutex;

const char* device_info(int device, DeviceInfo& out) {
  static DeviceInfo cache[64];
  static bool known[64] = {};
  if (device < 0 || device >= 64) return fail("moekd cuda: device index out of range");
  std::lock_guard<std::mutex> lock(g_mutex);
  if (!known[device]) {
    DeviceInfo d;
    int optin = 0;
    cudaError_t e = cudaDeviceGetAttribute(&d.cc_major, cudaDevAttrComputeCapabilityMajor, device);
    if (e == cudaSuccess) e = cudaDeviceGetAttribute(&d.sm_count, cudaDevAttrMultiProcessorCount, device);
    if (e == cudaSuccess) e = cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
    if (e != cudaSuccess) return fail(std::string("moekd cuda: querying the device failed: ") + cudaGetErrorString(e));
    d.smem_optin = optin;
    cache[device] = d;
    known[device] = true;
  }
  out = cache[device];
  return nullptr;
}

// Sets a function attribute of `kernel` once per (kernel, device, attribute).
// Always the same value per attribute, so concurrent callers never undo each other.
const char* set_attribute_once(const void* kernel, int device, cudaFuncAttribute attribute, int value) {
  static std::set<std::tuple<const void*, int, int>> done;
  std::lock_guard<std::mutex> lock(g_mutex);
  const auto key = std::make_tuple(kernel, device, static_cast<int>(attribute));
  if (done.count(key)) return nullptr;
  const cudaError_t e = cudaFuncSetAttribute(kernel, attribute, value);
  if (e != cudaSuccess) {
    cudaGetLastError();  // not sticky: clear it so the caller's later checks see only their own errors
    return fail(std::string("moekd cuda: cudaFuncSetAttribute failed: ") + cudaGetErrorString(e));
  }
  done.insert(key);
  return nullptr;
}

// Lets `kernel` use all the dynamic shared memory the device allows (always the maximum).
const char* allow_dynamic_smem(const void* kernel, int device, long long bytes) {
  return set_attribute_once(kernel, device, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
}

long long ceil_div(long long a, long long b) { return (a + b - 1) / b; }
long long round_up(long long a, long long b) { return ceil_div(a, b) * b; }

struct Plan {
  bool warp_rows = false;
  int threads = 0;
  int cluster = 1;
  bool cache = false;
  int cache_slots = 0;
  long long group_cache_vecs = 0;
  long long smem = 0;  // dynamic shared memory per block, bytes
  const void* kernel = nullptr;

  std::string describe() const {
    char buf[256];
    if (warp_rows) {
      snprintf(buf, sizeof buf, "warp rows: %d rows per block of %d threads, %s", threads / 32,
               threads, cache ? "shared-memory cache" : "no cache");
    } else {
      snprintf(buf, sizeof buf, "%s%d threads per block%s, %s",
               cluster > 1 ? "cluster rows: " : (cache ? "block rows: " : "streamed block rows: "), threads,
               cluster > 1 ? (std::string(" x") + std::to_string(cluster) + " blocks per row").c_str() : "",
               cache ? (std::string("shared-memory cache ") + std::to_string(smem) + " B/block").c_str()
                     : "no cache");
    }
    return buf;
  }
};

// Block-per-row cache geometry for a share of `chunks` chunks: threads and slots per
// thread, J * threads >= chunks.
void cached_geometry(long long chunks, int max_thr, int& threads, int& slots) {
  long long J = ceil_div(chunks, max_thr);
  if (J < kChunksPerThread) J = kChunksPerThread;
  long long thr = round_up(ceil_div(chunks, J), 32);
  if (thr < 32) thr = 32;
  threads = static_cast<int>(thr);
  slots = static_cast<int>(ceil_div(chunks, thr));
  if (slots < 1) slots = 1;
}

enum class ClusterFit { kOk, kTooLarge, kNotSchedulable, kError /* message in g_error */ };

// Cluster rows with K blocks per row: fills `plan` (its kernel already set) when the
// shares fit shared memory and the device can co-schedule such a cluster (a launch
// of one it cannot would fail).
ClusterFit plan_cluster(int device, long long dyn_max, long long chunks, long long vpc, int K, Plan& plan) {
  int threads, slots;
  cached_geometry(ceil_div(chunks, K), kCachedMaxThreads, threads, slots);
  const long long bytes = static_cast<long long>(slots) * threads * vpc * 16;
  if (bytes > dyn_max || bytes > kClusterBudgetMax) return ClusterFit::kTooLarge;
  if (allow_dynamic_smem(plan.kernel, device, dyn_max) != nullptr) return ClusterFit::kError;
  if (K > kPortableClusterBlocks &&
      set_attribute_once(plan.kernel, device, cudaFuncAttributeNonPortableClusterSizeAllowed, 1) != nullptr)
    return ClusterFit::kNotSchedulable;  // a device without non-portable sizes
  cudaLaunchConfig_t config = {};
  cudaLaunchAttribute attrs[1];
  attrs[0].id = cudaLaunchAttributeClusterDimension;
  attrs[0].val.clusterDim.x = K;
  attrs[0].val.clusterDim.y = 1;
  attrs[0].val.clusterDim.z = 1;
  config.gridDim = dim3(K, 1, 1);
  config.blockDim = dim3(threads, 1, 1);
  config.dynamicSmemBytes = static_cast<size_t>(bytes);
  config.attrs = attrs;
  config.numAttrs = 1;
  int active = 0;
  const cudaError_t e = cudaOccupancyMaxActiveClusters(&active, plan.kernel, &config);
  if (e != cudaSuccess || active < 1) {
    cudaGetLastError();  // clear; the caller falls back
    return ClusterFit::kNotSchedulable;
  }
  plan.threads = threads;
  plan.cluster = K;
  plan.cache = true;
  plan.cache_slots = slots;
  plan.group_cache_vecs = bytes / 16;
  plan.smem = bytes;
  return ClusterFit::kOk;
}

const char* make_plan(int device, long long C, int L, DType sd, DType td, int path, Plan& plan) {
  DeviceInfo dev;
  if (const char* err = device_info(device, dev)) return err;
  if (L < 1 || L > moekd::kMaxLevels) return fail("moekd cuda: number of levels out of range");
  if (C < 1 || C > 0x7fffffffLL) return fail("moekd cuda: num_classes must be in [1, 2^31)");
  if (path < kAuto || path > kStreamRow) return fail("moekd cuda: unknown path");

  const long long vpc = vecs_per_chunk(sd) + static_cast<long long>(L) * vecs_per_chunk(td);
  const long long chunks = C / kChunk;  // the most any row layout has
  const int max_thr = kMaxBlockThreads;

  const bool forced = path != kAuto;
  if (!forced) path = C <= kWarpRowsMaxClasses ? kWarpRows : kBlockRow;

  plan.warp_rows = path == kWarpRows;
  plan.kernel = kernel_for_dtypes(sd, td, plan.warp_rows);
  if (plan.kernel == nullptr) return fail("moekd cuda: unsupported dtype");
  cudaFuncAttributes attr;
  cudaError_t e = cudaFuncGetAttributes(&attr, plan.kernel);
  if (e != cudaSuccess)
    return fail(std::string("moekd cuda: the kernel cannot run on this device (") + cudaGetErrorString(e) +
                "); it was built for another architecture?");
  const long long dyn_max = dev.smem_optin - static_cast<long long>(attr.sharedSizeBytes);

  if (plan.warp_rows) {
    plan.threads = kWarpRowsThreads;
    plan.cache_slots = static_cast<int>(ceil_div(chunks, 32));
    plan.group_cache_vecs = static_cast<long long>(plan.cache_slots) * 32 * vpc;
    const long long bytes = plan.group_cache_vecs * (kWarpRowsThreads / 32) * 16;
    plan.cache = chunks > 0 && bytes <= kWarpCacheBudget && bytes <= dyn_max;
    plan.smem = plan.cache ? bytes : 0;
    return nullptr;
  }

  const long long row_bytes = chunks * vpc * 16;
  if (path == kBlockRow) {
    int threads = 0, slots = 0;
    long long bytes = 0;
    if (chunks > 0) {
      cached_geometry(chunks, kCachedMaxThreads, threads, slots);
      bytes = static_cast<long long>(slots) * threads * vpc * 16;
    }
    // Clusters only while a row needs at most kAutoMaxClusterBlocks blocks: on an H100
    // (bf16/fp32, N=16384) 2-block clusters beat streaming by 13% at C=32768, but 8 and
    // 16 blocks lost to it by 5-27% at C=131072 and 262144 (benchmarks/RESULTS.md).
    const bool cluster_can = dev.cc_major >= 9 && chunks >= 2 &&
                             row_bytes <= kAutoMaxClusterBlocks * kBlockCacheBudget;
    // Auto: one block within the budget; else a cluster; else one block with all the
    // shared memory there is (no clusters before sm_90); else streaming. Forced: one
    // block with any amount of shared memory, else streaming.
    const long long limit = forced || !cluster_can ? dyn_max : kBlockCacheBudget;
    if (chunks > 0 && bytes <= limit) {
      plan.threads = threads;
      plan.cache = true;
      plan.cache_slots = slots;
      plan.group_cache_vecs = bytes / 16;
      plan.smem = bytes;
      return nullptr;
    }
    path = !forced && cluster_can ? kClusterRow : kStreamRow;
  }

  if (path == kClusterRow) {
    if (dev.cc_major < 9) return fail("moekd cuda: cluster rows need compute capability 9.0+");
    if (chunks < 2) return fail("moekd cuda: cluster rows need C >= 16");
    // (Auto stops at kAutoMaxClusterBlocks; larger clusters are for a forced path.)
    // The fewest blocks whose shares fit the budget. Past 8 blocks (a row of more than
    // 8 x 96 KB, e.g. fp32 C=131072) 16 blocks of 64 KB give each SM three blocks to
    // hide memory latency with, where 8 blocks of 128 KB leave one; when 16 cannot be
    // scheduled, 8 with more shared memory per block, then streaming.
    int K = 2;
    while (K < kMaxClusterBlocks && ceil_div(row_bytes, K) > kBlockCacheBudget) K *= 2;
    ClusterFit fit = plan_cluster(device, dyn_max, chunks, vpc, K, plan);
    if (fit != ClusterFit::kOk && K > kPortableClusterBlocks)
      fit = plan_cluster(device, dyn_max, chunks, vpc, kPortableClusterBlocks, plan);
    if (fit == ClusterFit::kOk) return nullptr;
    if (fit == ClusterFit::kError) return g_error.c_str();
    if (fit == ClusterFit::kTooLarge)
      return fail("moekd cuda: the row does not fit the shared memory of an 8-block cluster");
    if (forced) return fail("moekd cuda: this cluster cannot be scheduled on the device");
    plan = Plan();
    plan.kernel = kernel_for_dtypes(sd, td, false);
    path = kStreamRow;
  }

  // kStreamRow (or a zero-chunk row under kBlockRow): one block, no cache.
  plan.threads = C >= 32LL * 1024 ? max_thr : static_cast<int>(round_up(ceil_div(C, 8 * kChunk), 32));
  if (plan.threads > max_thr) plan.threads = max_thr;
  if (plan.threads < 32) plan.threads = 32;
  plan.cluster = 1;
  plan.cache = false;
  plan.cache_slots = 0;
  plan.group_cache_vecs = 0;
  plan.smem = 0;
  return nullptr;
}

const char* dtype_check(DType d) {
  if (d != kFloat32 && d != kBFloat16 && d != kFloat16) return fail("moekd cuda: unsupported dtype");
  return nullptr;
}

// Restores the caller's current device.
struct DeviceGuard {
  int previous = -1;
  bool switched = false;
  const char* enter(int device) {
    cudaError_t e = cudaGetDevice(&previous);
    if (e != cudaSuccess) return fail(std::string("moekd cuda: cudaGetDevice failed: ") + cudaGetErrorString(e));
    if (previous != device) {
      e = cudaSetDevice(device);
      if (e != cudaSuccess) return fail(std::string("moekd cuda: cudaSetDevice failed: ") + cudaGetErrorString(e));
      switched = true;
    }
    return nullptr;
  }
  ~DeviceGuard() {
    if (switched) cudaSetDevice(previous);
  }
};

}  // namespace

const char* launch(const LaunchArgs& args) {
  if (const char* err = dtype_check(args.student_dtype)) return err;
  if (const char* err = dtype_check(args.teacher_dtype)) return err;
  if (args.num_rows == 0) return nullptr;
  DeviceGuard guard;
  if (const char* err = guard.enter(args.device)) return err;

  Plan plan;
  if (const char* err = make_plan(args.device, args.num_classes, args.params.num_levels, args.student_dtype,
                                  args.teacher_dtype, args.path, plan))
    return err;

  KernelArgs k;
  k.student = args.student;
  k.teacher = args.teacher;
  k.target = args.target;
  k.loss = args.loss;
  k.log_likelihood = args.log_likelihood;
  k.agreement = args.agreement;
  k.grad = args.grad != nullptr ? args.grad : moekd::cuda_row::no_grad_base();
  k.grad_scale = args.grad_scale;
  k.need_grad = args.grad != nullptr ? 1 : 0;
  k.num_rows = args.num_rows;
  k.student_row_stride = args.student_row_stride;
  k.teacher_level_stride = args.teacher_level_stride;
  k.teacher_row_stride = args.teacher_row_stride;
  k.num_classes = static_cast<int>(args.num_classes);
  k.cluster_size = plan.cluster;
  k.use_cache = plan.cache ? 1 : 0;
  k.prefetch = plan.cache && args.prefetch ? 1 : 0;
  k.cache_slots = plan.cache_slots;
  k.group_cache_vecs = plan.group_cache_vecs;
  k.kc = moekd::cuda_row::make_kernel_consts(args.params);

  long long blocks = plan.warp_rows ? ceil_div(args.num_rows, plan.threads / 32)
                                    : args.num_rows * static_cast<long long>(plan.cluster);
  if (blocks > 0x7fffffffLL) return fail("moekd cuda: too many rows for one launch");

  if (plan.smem > 0) {
    // Dynamic plus static shared memory past 48 KB needs the opt-in, also when the
    // dynamic part alone is exactly 48 KB (a launch failed so on an H100); done once.
    DeviceInfo dev;
    if (const char* err = device_info(args.device, dev)) return err;
    cudaFuncAttributes attr;
    const cudaError_t e = cudaFuncGetAttributes(&attr, plan.kernel);
    if (e != cudaSuccess) return fail(std::string("moekd cuda: ") + cudaGetErrorString(e));
    if (const char* err = allow_dynamic_smem(plan.kernel, args.device,
                                             dev.smem_optin - static_cast<long long>(attr.sharedSizeBytes)))
      return err;
  }

  cudaLaunchConfig_t config = {};
  config.gridDim = dim3(static_cast<unsigned>(blocks), 1, 1);
  config.blockDim = dim3(static_cast<unsigned>(plan.threads), 1, 1);
  config.dynamicSmemBytes = static_cast<size_t>(plan.smem);
  config.stream = static_cast<cudaStream_t>(args.stream);
  cudaLaunchAttribute attrs[1];
  if (plan.cluster > 1) {
    attrs[0].id = cudaLaunchAttributeClusterDimension;
    attrs[0].val.clusterDim.x = plan.cluster;
    attrs[0].val.clusterDim.y = 1;
    attrs[0].val.clusterDim.z = 1;
    config.attrs = attrs;
    config.numAttrs = 1;
  }
  void* kernel_args[] = {&k};
  cudaError_t e = cudaLaunchKernelExC(&config, plan.kernel, kernel_args);
  const cudaError_t last = cudaGetLastError();
  if (e == cudaSuccess) e = last;
  if (e != cudaSuccess) {
    return fail(std::string("moekd cuda: kernel launch failed (") + plan.describe() + ", C=" +
                std::to_string(args.num_classes) + ", N=" + std::to_string(args.num_rows) +
                "): " + cudaGetErrorString(e));
  }
  return nullptr;
}

const char* describe_plan(int device, long long num_classes, int num_levels, DType student_dtype,
                          DType teacher_dtype, int path, char* buf, size_t buf_size) {
  if (const char* err = dtype_check(student_dtype)) return err;
  if (const char* err = dtype_check(teacher_dtype)) return err;
  DeviceGuard guard;
  if (const char* err = guard.enter(device)) return err;
  Plan plan;
  if (const char* err = make_plan(device, num_classes, num_levels, student_dtype, teacher_dtype, path, plan))
    return err;
  snprintf(buf, buf_size, "%s (student %s, teacher %s)", plan.describe().c_str(), dtype_name(student_dtype),
           dtype_name(teacher_dtype));
  return nullptr;
}

}  // namespace moekd_cuda
