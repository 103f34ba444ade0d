// fusedrnn: persistent thread pool (see pool.h).
#include "pool.h"

#include <pthread.h>
#include <sched.h>
#include <unistd.h>

#include <algorithm>
#include <new>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define FUSEDRNN_PAUSE() _mm_pause()
#else
#define FUSEDRNN_PAUSE() ((void)0)
#endif

namespace fusedrnn {

void Team::barrier() {
  if (n_ == 1) return;
  const int phase = phase_.load(std::memory_order_acquire);
  if (arrived_.fetch_add(1, std::memory_order_acq_rel) == n_ - 1) {
    arrived_.store(0, std::memory_order_relaxed);
    phase_.store(phase + 1, std::memory_order_release);
    return;
  }
  // Spin (a step is microseconds); yield now and then so an oversubscribed
  // machine still makes progress.
  for (unsigned spins = 0; phase_.load(std::memory_order_acquire) == phase; ++spins) {
    FUSEDRNN_PAUSE();
    if ((spins & 1023) == 1023) sched_yield();
  }
}

namespace {

// The pool in use, its owner process, and the lock a job holds. All three are
// reset in a forked child, whose copy of the pool has no threads.
ThreadPool* g_pool = nullptr;
int g_pool_workers = 0;
std::mutex* g_busy = new std::mutex;

void reset_after_fork() {
  g_pool = nullptr;  // the parent's threads do not exist here: leak, never join
  g_pool_workers = 0;
  g_busy = new (std::nothrow) std::mutex;
}

struct ForkHook {
  ForkHook() { pthread_atfork(nullptr, nullptr, reset_after_fork); }
} g_fork_hook;

}  // namespace

ThreadPool::ThreadPool(int workers) {
#if defined(__linux__)
  last_cpu_.assign(size_t(workers), -1);
  pinned_.assign(size_t(workers), 0);
  CPU_ZERO(&allowed_);
#endif
  threads_.reserve(size_t(workers));
  for (int i = 0; i < workers; ++i) threads_.emplace_back([this, i] { worker_loop(i + 1); });
}

ThreadPool::~ThreadPool() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = true;
  }
  wake_.notify_all();
  for (auto& t : threads_) t.join();
}

ThreadPool* ThreadPool::instance(int workers) {
  // Called with *g_busy held: nobody else is using the pool.
  if (!g_pool || g_pool_workers < workers) {
    delete g_pool;
    g_pool = nullptr;
    g_pool = new ThreadPool(workers);
    g_pool_workers = workers;
  }
  return g_pool;
}

void ThreadPool::worker_loop(int tid) {
  long seen = 0;
  for (;;) {
    const Job* job;
    Team* team;
    {
      std::unique_lock<std::mutex> lock(mu_);
      wake_.wait(lock, [&] { return stop_ || generation_ != seen; });
      if (stop_) return;
      seen = generation_;
      if (tid > active_) continue;
      job = job_;
      team = team_;
    }
#if defined(__linux__)
    // The caller bound this thread to one CPU to place its wake-up; widen the
    // binding again. pinned_ and allowed_ were written before the job was
    // published under mu_.
    if (pinned_[size_t(tid - 1)])
      pthread_setaffinity_np(pthread_self(), sizeof allowed_, &allowed_);
#endif
    (*job)(tid, *team);
#if defined(__linux__)
    last_cpu_[size_t(tid - 1)] = sched_getcpu();  // read by the next job's caller
#endif
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (--pending_ == 0) done_.notify_one();
    }
  }
}

// Called with *g_busy held and every worker asleep (between jobs).
void ThreadPool::place(int workers) {
#if defined(__linux__)
  std::fill(pinned_.begin(), pinned_.end(), 0);
  if (std::chrono::steady_clock::now() - last_end_ < std::chrono::microseconds(100)) return;
  if (sched_getaffinity(0, sizeof allowed_, &allowed_) != 0) return;
  const int ncpu = CPU_COUNT(&allowed_);
  if (ncpu < 2) return;
  cpu_set_t used;
  CPU_ZERO(&used);
  const int me = sched_getcpu();
  if (me >= 0 && me < CPU_SETSIZE) CPU_SET(me, &used);
  int next = me < 0 ? 0 : me;  // the search for a free CPU goes on from here, cyclically
  for (int k = 0; k < workers && CPU_COUNT(&used) < ncpu; ++k) {
    int cpu = last_cpu_[size_t(k)];
    if (cpu < 0 || cpu >= CPU_SETSIZE || !CPU_ISSET(cpu, &allowed_) || CPU_ISSET(cpu, &used)) {
      cpu = -1;
      for (int i = 1; i <= CPU_SETSIZE && cpu < 0; ++i) {
        const int c = (next + i) % CPU_SETSIZE;
        if (CPU_ISSET(c, &allowed_) && !CPU_ISSET(c, &used)) cpu = c;
      }
      if (cpu < 0) break;
      next = cpu;
    }
    CPU_SET(cpu, &used);
    cpu_set_t one;
    CPU_ZERO(&one);
    CPU_SET(cpu, &one);
    pinned_[size_t(k)] =
        pthread_setaffinity_np(threads_[size_t(k)].native_handle(), sizeof one, &one) == 0;
  }
#else
  (void)workers;
#endif
}

int ThreadPool::run(int n, const Job& job) {
  std::unique_lock<std::mutex> busy(*g_busy, std::try_to_lock);
  if (n <= 1 || !busy.owns_lock()) {
    Team alone(1);
    job(0, alone);
    return 1;
  }
  ThreadPool* pool = instance(n - 1);
  pool->place(n - 1);
  Team team(n);
  {
    std::lock_guard<std::mutex> lock(pool->mu_);
    pool->job_ = &job;
    pool->team_ = &team;
    pool->active_ = n - 1;
    pool->pending_ = n - 1;
    ++pool->generation_;
  }
  pool->wake_.notify_all();
  job(0, team);
  std::unique_lock<std::mutex> lock(pool->mu_);
  pool->done_.wait(lock, [&] { return pool->pending_ == 0; });
#if defined(__linux__)
  pool->last_end_ = std::chrono::steady_clock::now();
#endif
  return n;
}

}  // namespace fusedrnn
