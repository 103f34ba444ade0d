// fusedrnn: a host emulator of the small part of CUDA the backend uses, so the
// kernels and drivers of rnn_cuda.cu run unchanged on the CPU (built as
// fusedrnn._cuda_emu with FUSEDRNN_CUDA_EMULATOR=ON; see runtime.h).
//
// What is emulated, and how:
// - Ordinary launches run block by block, thread by thread, in one OS thread
//   (none of those kernels synchronises within a block).
// - Cooperative launches run every CUDA thread as a fiber (ucontext) on the
//   calling thread, with real barriers for __syncthreads and grid.sync (a
//   fiber waits until all participants arrive), per-block shared memory, and
//   __shfl_xor_sync through per-warp exchange slots.
// - Device memory is host memory. Fresh allocations are filled with 0xff bytes
//   (NaN as floats), so a read of memory no kernel wrote shows up in results.
// - Streams are ignored: everything is synchronous, in call order. Events
//   record the host's clock (plus the delays of FUSEDRNN_EMU_COOP_DELAY_MS,
//   _CLUSTER_DELAY_MS and _GEMM_DELAY_MS, for benchmark-mode tests).
// - cuBLAS's GemmEx is a plain column-major loop with float accumulation
//   (cublas_dyn.cpp).
// - The emulated device has FUSEDRNN_EMU_SMS multiprocessors (default 4) and
//   FUSEDRNN_EMU_SMEM bytes of shared memory per block (default 227 KiB), so
//   the persistent kernels split H among several blocks even for small H, and
//   tests can make them stage the batch in parts.
// Not emulated: real concurrency between ordinary threads, warp divergence,
// memory-model subtleties beyond what the barriers give, performance.
#pragma once

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <cstdio>
#include <ucontext.h>
#include <functional>
#include <memory>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) alignas(n)

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned a = 1, unsigned b = 1, unsigned c = 1) : x(a), y(b), z(c) {}
};

using cudaStream_t = struct CUstream_st*;
enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidValue = 1, cudaErrorMemoryAllocation = 2 };
enum cudaMemcpyKind {
  cudaMemcpyHostToHost = 0, cudaMemcpyHostToDevice = 1, cudaMemcpyDeviceToHost = 2,
  cudaMemcpyDeviceToDevice = 3, cudaMemcpyDefault = 4
};
enum cudaDeviceAttr { cudaDevAttrMultiProcessorCount = 16, cudaDevAttrComputeCapabilityMajor = 75,
                      cudaDevAttrCooperativeLaunch = 95, cudaDevAttrMaxSharedMemoryPerBlockOptin = 97,
                      cudaDevAttrClusterLaunch = 120 };
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8,
                         cudaFuncAttributeNonPortableClusterSizeAllowed = 12 };
enum cudaMemoryType { cudaMemoryTypeUnregistered = 0, cudaMemoryTypeHost = 1, cudaMemoryTypeDevice = 2,
                      cudaMemoryTypeManaged = 3 };
struct cudaPointerAttributes {
  cudaMemoryType type;
  int device;
  void* devicePointer;
  void* hostPointer;
};
struct cudaDeviceProp {
  char name[256];
};

namespace emu {

struct BlockShared;
struct Barrier;
struct Fiber;
struct Scheduler;

struct ThreadCtx {
  dim3 block, thread, block_dim, grid_dim;
  BlockShared* shared = nullptr;
  std::vector<BlockShared>* all_shared = nullptr;  // every block's (cluster launches)
  Barrier* grid_barrier = nullptr;
  Fiber* fiber = nullptr;
  Scheduler* sched = nullptr;
};

// The context of the CUDA thread running now: an OS thread's own outside
// cooperative launches, the running fiber's inside them.
inline ThreadCtx*& current() {
  thread_local ThreadCtx base;
  thread_local ThreadCtx* cur = &base;
  return cur;
}
inline ThreadCtx& ctx() { return *current(); }

// Cooperative launches run each CUDA thread as a fiber (ucontext) on the
// calling OS thread; a barrier parks the fiber until every participant has
// arrived. One OS thread: deterministic, and cheap enough to run under ASan.
struct Fiber {
  ThreadCtx c;
  ucontext_t uc;
  std::unique_ptr<char[]> stack;
  std::function<void()> body;
  bool done = false, waiting = false;
};

struct Scheduler {
  ucontext_t main;
  std::vector<std::unique_ptr<Fiber>> fibers;

  void park() {  // from a fiber: back to the scheduler until released
    Fiber* f = ctx().fiber;
    f->waiting = true;
    swapcontext(&f->uc, &main);
  }

  void start(std::unique_ptr<Fiber> f, std::size_t stack) {
    f->stack.reset(new char[stack]);
    getcontext(&f->uc);
    f->uc.uc_stack.ss_sp = f->stack.get();
    f->uc.uc_stack.ss_size = stack;
    f->uc.uc_link = &main;
    makecontext(&f->uc, &Scheduler::entry, 0);
    fibers.push_back(std::move(f));
  }

  static void entry() {
    Fiber* f = ctx().fiber;
    f->body();
    f->done = true;  // returns to main through uc_link
  }

  void run_all() {
    std::size_t remaining = fibers.size();
    ThreadCtx* outside = current();
    while (remaining) {
      bool progressed = false;
      for (auto& f : fibers) {
        if (f->done || f->waiting) continue;
        progressed = true;
        current() = &f->c;
        swapcontext(&main, &f->uc);
        current() = outside;
        if (f->done) --remaining;
      }
      if (!progressed) {
        std::fprintf(stderr, "fusedrnn emulator: deadlock (threads wait at different barriers)\n");
        std::abort();
      }
    }
  }
};

struct Barrier {
  explicit Barrier(int n) : count(n) {}
  void wait() {
    if (++arrived == count) {  // release everyone parked here
      arrived = 0;
      for (Fiber* w : waiters) w->waiting = false;
      waiters.clear();
      return;
    }
    waiters.push_back(ctx().fiber);
    ctx().sched->park();
  }
  int count, arrived = 0;
  std::vector<Fiber*> waiters;
};

struct BlockShared {
  std::vector<unsigned char> smem;
  std::unique_ptr<Barrier> block_barrier;
  std::vector<std::unique_ptr<Barrier>> warp_barriers;
  std::vector<float> warp_slots;  // 32 per warp
};

inline int sms() {
  const char* e = std::getenv("FUSEDRNN_EMU_SMS");
  const int n = e ? std::atoi(e) : 4;
  return n > 0 ? n : 4;
}

// A launch configuration a GPU refuses (cudaErrorInvalidConfiguration, which
// the backend would meet at its next error check): an empty grid or block, or
// more than 1024 threads or 65535 blocks in y. Refused here at once.
inline void check_config(dim3 grid, dim3 block) {
  if (grid.x == 0 || grid.y == 0 || block.x == 0 || block.x > 1024 || grid.y > 65535)
    throw std::runtime_error("emulated launch: invalid configuration (grid " +
                             std::to_string(grid.x) + " x " + std::to_string(grid.y) +
                             ", block " + std::to_string(block.x) + ")");
}

// An ordinary launch: every (block, thread) in turn.
template <typename F>
void run(dim3 grid, dim3 block, F&& body) {
  check_config(grid, block);
  ThreadCtx& c = ctx();
  const ThreadCtx saved = c;
  c.grid_dim = grid;
  c.block_dim = block;
  for (unsigned by = 0; by < grid.y; ++by)
    for (unsigned bx = 0; bx < grid.x; ++bx)
      for (unsigned tx = 0; tx < block.x; ++tx) {
        c.block = dim3(bx, by);
        c.thread = dim3(tx);
        body();
      }
  c = saved;
}

template <typename K>
struct Launcher {
  dim3 grid, block;
  K kernel;
  template <typename... A>
  void operator()(A&&... args) const {
    run(grid, block, [&] { kernel(args...); });
  }
};

template <typename K>
Launcher<K> launcher(dim3 grid, dim3 block, K kernel) {
  return Launcher<K>{grid, block, kernel};
}

// A cooperative launch: all threads as fibers, with real barriers.
template <typename F>
void run_cooperative(int blocks, int threads, std::size_t smem, F&& body) {
  check_config(dim3(blocks > 0 ? blocks : 0), dim3(threads > 0 ? threads : 0));
  constexpr std::size_t kStack = 256 * 1024;
  Barrier grid_barrier(blocks * threads);
  const int warps = (threads + 31) / 32;
  std::vector<BlockShared> shared(blocks);
  for (auto& s : shared) {
    s.smem.assign((smem ? smem : 1) + 16, 0xff);  // (+16: room to align it as a GPU does)
    s.block_barrier = std::make_unique<Barrier>(threads);
    for (int w = 0; w < warps; ++w)
      s.warp_barriers.push_back(std::make_unique<Barrier>(std::min(32, threads - 32 * w)));
    s.warp_slots.assign(32 * warps, 0.f);
  }
  Scheduler sched;
  for (int b = 0; b < blocks; ++b)
    for (int t = 0; t < threads; ++t) {
      auto f = std::make_unique<Fiber>();
      f->c.grid_dim = dim3(blocks);
      f->c.block_dim = dim3(threads);
      f->c.block = dim3(b);
      f->c.thread = dim3(t);
      f->c.shared = &shared[b];
      f->c.all_shared = &shared;
      f->c.grid_barrier = &grid_barrier;
      f->c.fiber = f.get();
      f->c.sched = &sched;
      f->body = [&body] { body(); };
      sched.start(std::move(f), kStack);
    }
  sched.run_all();
}

inline unsigned char* shared_mem(BlockShared& s) {  // 16-byte aligned
  unsigned char* p = s.smem.data();
  return p + (16 - reinterpret_cast<std::uintptr_t>(p) % 16) % 16;
}
inline unsigned char* shared_mem() { return shared_mem(*ctx().shared); }

// A cluster launch is one cluster (the grid): the address in block rank's
// shared memory of what p is in this block's (distributed shared memory).
template <typename T>
T* map_shared_rank(T* p, int rank) {
  ThreadCtx& c = ctx();
  unsigned char* own = shared_mem();
  const std::ptrdiff_t off = reinterpret_cast<unsigned char*>(const_cast<std::remove_cv_t<T>*>(p)) - own;
  const std::size_t size = c.shared->smem.size() - 16;
  if (rank < 0 || rank >= static_cast<int>(c.all_shared->size()) || off < 0 ||
      static_cast<std::size_t>(off) + sizeof(T) > size) {
    std::fprintf(stderr, "fusedrnn emulator: map_shared_rank out of range\n");
    std::abort();
  }
  return reinterpret_cast<T*>(shared_mem((*c.all_shared)[rank]) + off);
}

// 16-byte loads and stores (uint4 on a GPU), which need 16-byte alignment
// there: a misaligned address aborts here too.
struct Bytes16 {
  unsigned char b[16];
};
inline void check_aligned16(const void* p) {
  if (reinterpret_cast<std::uintptr_t>(p) % 16 != 0) {
    std::fprintf(stderr, "fusedrnn emulator: misaligned 16-byte access at %p\n", p);
    std::abort();
  }
}
inline Bytes16 load16(const void* p) {
  check_aligned16(p);
  Bytes16 v;
  std::memcpy(v.b, p, 16);
  return v;
}
inline void store16(void* p, const Bytes16& v) {
  check_aligned16(p);
  std::memcpy(p, v.b, 16);
}

// Shared memory per block (opt-in): 227 KiB as on H100/H200, or
// FUSEDRNN_EMU_SMEM bytes, so that tests can make it small.
inline int smem_optin() {
  const char* e = std::getenv("FUSEDRNN_EMU_SMEM");
  const int n = e ? std::atoi(e) : 0;
  return n > 0 ? n : 232448;
}

inline float shfl_xor(float v, int off) {
  ThreadCtx& c = ctx();
  const int lane = c.thread.x & 31, warp = c.thread.x >> 5;
  Barrier& bar = *c.shared->warp_barriers[warp];
  float* slots = c.shared->warp_slots.data() + 32 * warp;
  slots[lane] = v;
  bar.wait();
  const float r = slots[lane ^ off];
  bar.wait();
  return r;
}

}  // namespace emu

#define blockIdx (::emu::ctx().block)
#define threadIdx (::emu::ctx().thread)
#define blockDim (::emu::ctx().block_dim)
#define gridDim (::emu::ctx().grid_dim)
#define FUSEDRNN_LAUNCH(grid, block, smem, stream, ...) ::emu::launcher(grid, block, __VA_ARGS__)
#define FUSEDRNN_SHARED_BYTES(name) unsigned char* name = ::emu::shared_mem()

inline void __syncthreads() { ::emu::ctx().shared->block_barrier->wait(); }
inline float __shfl_xor_sync(unsigned, float v, int off) { return ::emu::shfl_xor(v, off); }
using std::max;
using std::min;

namespace cooperative_groups {
struct grid_group {
  void sync() const { ::emu::ctx().grid_barrier->wait(); }
};
inline grid_group this_grid() { return {}; }
// (a cluster launch here is one cluster: the whole grid)
struct cluster_group {
  void sync() const { ::emu::ctx().grid_barrier->wait(); }
  template <typename T>
  T* map_shared_rank(T* p, int rank) const { return ::emu::map_shared_rank(p, rank); }
};
inline cluster_group this_cluster() { return {}; }
}  // namespace cooperative_groups

// 16-bit float types: IEEE half through the compiler's _Float16, bfloat16 as
// the top half of a float32 with round-to-nearest-even.
struct __half {
  _Float16 v;
};
inline float __half2float(__half h) { return static_cast<float>(h.v); }
inline __half __float2half_rn(float f) { return __half{static_cast<_Float16>(f)}; }
struct __nv_bfloat16 {
  uint16_t bits;
};
inline float __bfloat162float(__nv_bfloat16 b) {
  const uint32_t u = static_cast<uint32_t>(b.bits) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if (std::isnan(f)) return __nv_bfloat16{static_cast<uint16_t>((u >> 16) | 0x40)};
  u += 0x7fff + ((u >> 16) & 1);
  return __nv_bfloat16{static_cast<uint16_t>(u >> 16)};
}

// --- the runtime API subset ------------------------------------------------
inline cudaError_t cudaGetDevice(int* d) { *d = 0; return cudaSuccess; }
inline cudaError_t cudaSetDevice(int d) { return d == 0 ? cudaSuccess : cudaErrorInvalidValue; }
inline cudaError_t cudaGetDeviceCount(int* n) { *n = 1; return cudaSuccess; }
inline cudaError_t cudaGetLastError() { return cudaSuccess; }
inline const char* cudaGetErrorName(cudaError_t e) {
  return e == cudaSuccess ? "cudaSuccess" : e == cudaErrorMemoryAllocation ? "cudaErrorMemoryAllocation"
                                                                           : "cudaErrorInvalidValue";
}
inline const char* cudaGetErrorString(cudaError_t e) { return cudaGetErrorName(e); }
inline cudaError_t cudaRuntimeGetVersion(int* v) { *v = 0; return cudaSuccess; }
inline cudaError_t cudaGetDeviceProperties(cudaDeviceProp* p, int d) {
  if (d != 0) return cudaErrorInvalidValue;
  std::snprintf(p->name, sizeof p->name, "fusedrnn host emulator");
  return cudaSuccess;
}
inline cudaError_t cudaDeviceGetAttribute(int* v, cudaDeviceAttr a, int) {
  *v = a == cudaDevAttrMultiProcessorCount      ? ::emu::sms()
       : a == cudaDevAttrCooperativeLaunch      ? 1
       : a == cudaDevAttrClusterLaunch          ? 1
       : a == cudaDevAttrComputeCapabilityMajor ? 9
                                                : ::emu::smem_optin();
  return cudaSuccess;
}
template <typename K>
inline cudaError_t cudaFuncSetAttribute(K, cudaFuncAttribute, int) { return cudaSuccess; }
template <typename K>
inline cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* n, K, int, std::size_t) {
  *n = 1;
  return cudaSuccess;
}
inline cudaError_t cudaMallocAsync(void** p, std::size_t n, cudaStream_t) {
  *p = std::malloc(n ? n : 1);
  if (!*p) return cudaErrorMemoryAllocation;
  std::memset(*p, 0xff, n);
  return cudaSuccess;
}
inline cudaError_t cudaFreeAsync(void* p, cudaStream_t) { std::free(p); return cudaSuccess; }
inline cudaError_t cudaFree(void* p) { std::free(p); return cudaSuccess; }
inline cudaError_t cudaMemcpyAsync(void* d, const void* s, std::size_t n, cudaMemcpyKind, cudaStream_t) {
  if (n) std::memcpy(d, s, n);
  return cudaSuccess;
}
inline cudaError_t cudaMemsetAsync(void* d, int v, std::size_t n, cudaStream_t) {
  if (n) std::memset(d, v, n);
  return cudaSuccess;
}
inline cudaError_t cudaStreamSynchronize(cudaStream_t) { return cudaSuccess; }
using cudaEvent_t = struct CUevent_st*;
using cudaMemPool_t = struct CUmemPoolHandle_st*;
enum cudaMemPoolAttr { cudaMemPoolAttrReleaseThreshold = 4 };
inline cudaError_t cudaDeviceGetDefaultMemPool(cudaMemPool_t* p, int) { *p = nullptr; return cudaSuccess; }
inline cudaError_t cudaMemPoolSetAttribute(cudaMemPool_t, cudaMemPoolAttr, void*) { return cudaSuccess; }
// Events hold the time they were recorded (everything is synchronous): the
// host's steady clock plus the emulated delays below.
struct CUevent_st {
  double ms = 0;
};
namespace emu {
// Milliseconds added to the events' clock by FUSEDRNN_EMU_COOP_DELAY_MS per
// cooperative launch, FUSEDRNN_EMU_CLUSTER_DELAY_MS per cluster launch and
// FUSEDRNN_EMU_GEMM_DELAY_MS per GEMM, so tests can make any of benchmark
// mode's variants (persistent in grid or cluster mode, standard) the slower.
inline std::atomic<int64_t>& delay_us() {
  static std::atomic<int64_t> us{0};
  return us;
}
inline void add_delay(const char* env) {
  const char* e = std::getenv(env);
  if (e) delay_us() += static_cast<int64_t>(std::atof(e) * 1000.0);
}
// The persistent launches since the last take_launch_log(): "grid" for a
// cooperative launch, "cluster" for a cluster launch (tests check which ran).
inline std::vector<std::string>& launch_log() {
  static std::vector<std::string> log;
  return log;
}
// A persistent launch of `kind` ("grid" or "cluster"): its delay (env) and its log entry.
inline void record_launch(const char* kind, const char* env) {
  add_delay(env);
  launch_log().push_back(kind);
}
inline std::vector<std::string> take_launch_log() {
  std::vector<std::string> out;
  out.swap(launch_log());
  return out;
}
}  // namespace emu
constexpr unsigned cudaEventDefault = 0;
constexpr unsigned cudaEventDisableTiming = 2;
inline cudaError_t cudaEventCreateWithFlags(cudaEvent_t* e, unsigned) {
  *e = new CUevent_st();
  return cudaSuccess;
}
inline cudaError_t cudaEventRecord(cudaEvent_t e, cudaStream_t) {
  const auto now = std::chrono::steady_clock::now().time_since_epoch();
  e->ms = std::chrono::duration<double, std::milli>(now).count() + emu::delay_us().load() / 1000.0;
  return cudaSuccess;
}
inline cudaError_t cudaEventSynchronize(cudaEvent_t) { return cudaSuccess; }
inline cudaError_t cudaEventElapsedTime(float* ms, cudaEvent_t a, cudaEvent_t b) {
  *ms = static_cast<float>(b->ms - a->ms);
  return cudaSuccess;
}
inline cudaError_t cudaStreamWaitEvent(cudaStream_t, cudaEvent_t, unsigned) { return cudaSuccess; }
inline cudaError_t cudaEventDestroy(cudaEvent_t e) {
  delete e;
  return cudaSuccess;
}
enum cudaStreamCaptureStatus { cudaStreamCaptureStatusNone = 0, cudaStreamCaptureStatusActive = 1 };
// FUSEDRNN_EMU_CAPTURING=1: every stream reports a capture under way.
inline cudaError_t cudaStreamIsCapturing(cudaStream_t, cudaStreamCaptureStatus* s) {
  const char* e = std::getenv("FUSEDRNN_EMU_CAPTURING");
  *s = e && std::string(e) == "1" ? cudaStreamCaptureStatusActive : cudaStreamCaptureStatusNone;
  return cudaSuccess;
}
inline cudaError_t cudaDeviceSynchronize() { return cudaSuccess; }
inline cudaError_t cudaPointerGetAttributes(cudaPointerAttributes* a, const void* p) {
  a->type = cudaMemoryTypeDevice;
  a->device = 0;
  a->devicePointer = const_cast<void*>(p);
  a->hostPointer = nullptr;
  return cudaSuccess;
}

namespace fusedrnn {
namespace cuda {
template <typename Arg>
void launch_cooperative(void (*kernel)(Arg), int blocks, int threads, std::size_t smem,
                        cudaStream_t, Arg& arg) {
  ::emu::record_launch("grid", "FUSEDRNN_EMU_COOP_DELAY_MS");
  ::emu::run_cooperative(blocks, threads, smem, [&] { kernel(arg); });
}
// One cluster of `blocks` blocks (as a cooperative launch here).
template <typename Arg>
void launch_cluster(void (*kernel)(Arg), int blocks, int threads, std::size_t smem,
                    cudaStream_t, Arg& arg) {
  ::emu::record_launch("cluster", "FUSEDRNN_EMU_CLUSTER_DELAY_MS");
  ::emu::run_cooperative(blocks, threads, smem, [&] { kernel(arg); });
}
// Clusters of `blocks` that can be resident at once: one here, or none
// beyond FUSEDRNN_EMU_MAX_CLUSTER blocks (to test the fallback).
template <typename Arg>
int max_active_clusters(void (*)(Arg), int blocks, int, std::size_t) {
  const char* e = std::getenv("FUSEDRNN_EMU_MAX_CLUSTER");
  return e && blocks > std::atoi(e) ? 0 : 1;
}
}  // namespace cuda
}  // namespace fusedrnn
