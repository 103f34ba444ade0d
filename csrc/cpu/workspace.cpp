// fusedrnn: caches of freed blocks (see buffer.h).
//
// Every call allocates its temporaries (packed weights, gate buffers, ...)
// and training allocates its cache. Returned to the system, such blocks come
// back as fresh pages and each page faults again on first touch, which costs
// as much as the math for short sequences. Freed blocks are kept here
// instead, up to kMaxBlocks blocks and keep_limit() bytes in all; a request
// takes the smallest kept block that is large enough and at most twice its
// size. Over the count, the smallest block goes (the cheapest to fault in
// again; dropping the largest first threw away a layer's gate buffer at
// every call once a smaller shape had filled the slots: 12,800 page faults
// per LSTM call at B = 64, H = 512); over the bytes, the longest kept ones go.
// Blocks under 64 KiB are kept per thread instead (at most 8 of each
// power-of-two size, about 1 MiB a thread), without a lock.
//
// The arrays that calls return (outputs, gradients) of 128 KiB or more come
// from the same kept blocks and return to them when freed (output_alloc):
// a training loop gets the pages back that the last step's gradients had.
// They are not counted as working memory.
#include <pthread.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <mutex>
#include <new>
#include <vector>

#include "fusedrnn/buffer.h"

namespace fusedrnn {

namespace {

constexpr std::size_t kMinKeepBytes = std::size_t(256) << 20;
constexpr std::size_t kMaxBlocks = 64;
constexpr std::size_t kMinCached = std::size_t(64) << 10;  // smaller: kept per thread

struct Block {
  void* p;
  std::size_t bytes;
  std::uint64_t seq;  // when it was kept (larger: later)
};

// Bytes handed out and not yet returned (by every thread), and their
// highest value since the last reset: the working memory that tests and the
// benchmark report.
std::atomic<std::size_t> g_in_use{0}, g_peak{0};
// Bytes of returned arrays alive now (output_alloc), and the most bytes of
// working memory and returned arrays alive at once since the start.
std::atomic<std::size_t> g_outputs{0}, g_high{0};

void raise_to(std::atomic<std::size_t>& max, std::size_t now) {
  std::size_t m = max.load(std::memory_order_relaxed);
  while (now > m && !max.compare_exchange_weak(m, now, std::memory_order_relaxed)) {
  }
}

void count_alloc(std::size_t bytes) {
  const std::size_t now = g_in_use.fetch_add(bytes, std::memory_order_relaxed) + bytes;
  raise_to(g_peak, now);
  raise_to(g_high, now + g_outputs.load(std::memory_order_relaxed));
}

// The bytes kept at most: 256 MiB, or as many as the process has had alive
// at once (working memory and returned arrays) up to a quarter of the
// machine's memory. A training step that needs more than 256 MiB gets all of
// its blocks back at the next step; with 256 MiB, LSTM T = 50, B = 128,
// H = 1024 (349 MiB of working memory) faulted in fresh pages for the rest
// at every step, 5.6% of its time.
std::size_t keep_limit() {
  static const std::size_t quarter = [] {
    const long pages = sysconf(_SC_PHYS_PAGES), page = sysconf(_SC_PAGE_SIZE);
    return pages > 0 && page > 0 ? std::size_t(pages) * std::size_t(page) / 4 : kMinKeepBytes;
  }();
  return std::max(kMinKeepBytes, std::min(quarter, g_high.load(std::memory_order_relaxed)));
}

// Small blocks (below kMinCached) are kept per thread, a few of each
// power-of-two size from 64 bytes: a tiny call allocates a dozen of them, and
// aligned malloc/free of each costs as much as its math.
constexpr int kSmallClasses = 11;  // 64 B << 0 .. 10: up to 64 KiB
constexpr std::size_t kSmallKeep = 8;  // blocks kept per class and thread

int small_class(std::size_t bytes) {
  int c = 0;
  while ((std::size_t(64) << c) < bytes) ++c;
  return c;
}

thread_local bool t_small_gone = false;  // this thread's cache is destroyed (thread exit)

struct SmallCache {
  void* blocks[kSmallClasses][kSmallKeep];
  std::size_t n[kSmallClasses] = {};
  ~SmallCache() {
    t_small_gone = true;
    for (int c = 0; c < kSmallClasses; ++c)
      for (std::size_t i = 0; i < n[c]; ++i) std::free(blocks[c][i]);
  }
};
thread_local SmallCache t_small;

std::mutex g_mu;
std::vector<Block>* g_blocks = new std::vector<Block>;  // never destroyed: used until exit
std::size_t g_cached = 0;
std::uint64_t g_seq = 0;

// A child forked while another thread held the lock starts with a free one.
struct ForkHook {
  ForkHook() {
    pthread_atfork(nullptr, nullptr, [] { new (&g_mu) std::mutex; });
  }
} g_fork_hook;

// Sizes are kept in whole 64-byte lines.
std::size_t rounded(std::size_t bytes) { return (bytes + 63) / 64 * 64; }

// Takes kept block i out of the list (the lock held); returns its memory.
void* remove_block(std::size_t i) {
  void* p = (*g_blocks)[i].p;
  g_cached -= (*g_blocks)[i].bytes;
  (*g_blocks)[i] = g_blocks->back();
  g_blocks->pop_back();
  return p;
}

// A kept block of [bytes, 2 * bytes] (the smallest), or nullptr.
void* take_cached(std::size_t bytes) {
  std::lock_guard<std::mutex> lock(g_mu);
  std::size_t best = g_blocks->size();
  for (std::size_t i = 0; i < g_blocks->size(); ++i) {
    const std::size_t b = (*g_blocks)[i].bytes;
    if (b >= bytes && b / 2 <= bytes && (best == g_blocks->size() || b < (*g_blocks)[best].bytes))
      best = i;
  }
  return best == g_blocks->size() ? nullptr : remove_block(best);
}

// A block of at least kMinCached bytes: a kept one, else a new one.
void* take_or_alloc(std::size_t bytes) {
  void* p = take_cached(bytes);
  if (!p) p = std::aligned_alloc(64, bytes);
  if (!p) throw std::bad_alloc();
  return p;
}

// Frees kept block i (the lock held).
void drop_block(std::size_t i) { std::free(remove_block(i)); }

// Keeps a freed block of at least kMinCached bytes (or frees it).
void keep_block(void* p, std::size_t bytes) {
  const std::size_t limit = keep_limit();
  if (bytes > limit) {
    std::free(p);
    return;
  }
  std::lock_guard<std::mutex> lock(g_mu);
  while (g_cached + bytes > limit) {  // over the bytes: the longest kept first
    std::size_t old = 0;
    for (std::size_t i = 1; i < g_blocks->size(); ++i)
      if ((*g_blocks)[i].seq < (*g_blocks)[old].seq) old = i;
    drop_block(old);
  }
  if (g_blocks->size() >= kMaxBlocks) {  // over the count: the smallest, maybe this one
    std::size_t small = 0;
    for (std::size_t i = 1; i < g_blocks->size(); ++i)
      if ((*g_blocks)[i].bytes < (*g_blocks)[small].bytes) small = i;
    if ((*g_blocks)[small].bytes >= bytes) {
      std::free(p);
      return;
    }
    drop_block(small);
  }
  g_blocks->push_back({p, bytes, ++g_seq});
  g_cached += bytes;
}

}  // namespace

void* workspace_alloc(std::size_t bytes) {
  bytes = rounded(bytes);
  if (bytes < kMinCached) {
    const int c = small_class(bytes);
    void* p = nullptr;
    if (!t_small_gone && t_small.n[c]) p = t_small.blocks[c][--t_small.n[c]];
    else p = std::aligned_alloc(64, std::size_t(64) << c);
    if (!p) throw std::bad_alloc();
    count_alloc(bytes);
    return p;
  }
  void* p = take_or_alloc(bytes);
  count_alloc(bytes);
  return p;
}

void workspace_free(void* p, std::size_t bytes) {
  if (!p) return;
  bytes = rounded(bytes);
  g_in_use.fetch_sub(bytes, std::memory_order_relaxed);
  if (bytes < kMinCached) {
    const int c = small_class(bytes);
    if (!t_small_gone && t_small.n[c] < kSmallKeep) t_small.blocks[c][t_small.n[c]++] = p;
    else std::free(p);
    return;
  }
  keep_block(p, bytes);
}

// Result arrays below this come from malloc, whose recently freed memory is still
// in cache. From glibc's mmap threshold (128 KiB) on, malloc maps fresh pages for
// each array and, when its thresholds have adapted, often trims them from the heap
// again on free: a NumPy training loop of GRU(256, 256) at T = 1 took 176 page
// faults per step in its 768 KiB weight gradients, and its backward 500 µs
// instead of 100 (1 MiB was the limit before).
constexpr std::size_t kMinOutput = std::size_t(128) << 10;

std::size_t output_block_min() { return kMinOutput; }

void* output_alloc(std::size_t bytes) {
  bytes = rounded(bytes);
  void* p = take_or_alloc(bytes);
  const std::size_t now = g_outputs.fetch_add(bytes, std::memory_order_relaxed) + bytes;
  raise_to(g_high, now + g_in_use.load(std::memory_order_relaxed));
  return p;
}

void output_free(void* p, std::size_t bytes) {
  if (!p) return;
  bytes = rounded(bytes);
  g_outputs.fetch_sub(bytes, std::memory_order_relaxed);
  keep_block(p, bytes);
}

std::size_t workspace_keep_limit() { return keep_limit(); }

std::size_t workspace_cached_bytes() {
  std::lock_guard<std::mutex> lock(g_mu);
  return g_cached;
}

void workspace_release() {
  if (!t_small_gone)
    for (int c = 0; c < kSmallClasses; ++c)
      while (t_small.n[c]) std::free(t_small.blocks[c][--t_small.n[c]]);
  std::lock_guard<std::mutex> lock(g_mu);
  for (const Block& b : *g_blocks) std::free(b.p);
  g_blocks->clear();
  g_cached = 0;
}

}  // namespace fusedrnn

namespace fusedrnn {

std::size_t workspace_in_use_bytes() { return g_in_use.load(std::memory_order_relaxed); }
std::size_t workspace_peak_bytes() { return g_peak.load(std::memory_order_relaxed); }
void workspace_reset_peak() { g_peak.store(g_in_use.load(std::memory_order_relaxed)); }

}  // namespace fusedrnn
