// fusedrnn: persistent thread pool (see pool.h).
#include "pool.h"

#include <pthread.h>
#include <sched.h>
#include <unistd.h>

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
    (*job)(tid, *team);
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (--pending_ == 0) done_.notify_one();
    }
  }
}

int ThreadPool::run(int n, const Job& job) {
  std::unique_lock<std::mutex> busy(*g_busy, std::try_to_lock);
  if (n <= 1 || !busy.owns_lock()) {
    Team alone(1);
    job(0, alone);
    return 1;
  }
  ThreadPool* pool = instance(n - 1);
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
  return n;
}

}  // namespace fusedrnn
