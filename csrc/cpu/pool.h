// fusedrnn: a persistent thread pool with a per-step barrier.
//
// One job at a time: run(n, fn) calls fn(tid, n) on n threads (the caller is
// tid 0) and returns when all are done. Inside fn, Team::barrier() syncs the
// n threads (a spinning sense-reversing barrier: one per recurrent step costs
// well under a microsecond). Idle workers sleep on a condition variable, so
// they never compete with BLAS threads between jobs.
//
// A caller that finds the pool busy (another Python thread is using it) runs
// its job alone on its own thread; results do not depend on the thread count.
#pragma once

#include <atomic>
#include <condition_variable>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

namespace fusedrnn {

class Team {
 public:
  explicit Team(int n) : n_(n) {}
  int size() const { return n_; }
  void barrier();

 private:
  const int n_;
  alignas(64) std::atomic<int> arrived_{0};
  alignas(64) std::atomic<int> phase_{0};
};

class ThreadPool {
 public:
  using Job = std::function<void(int tid, Team& team)>;

  // Runs job on up to n threads; returns the number used.
  static int run(int n, const Job& job);

 private:
  explicit ThreadPool(int workers);
  ~ThreadPool();
  void worker_loop(int tid);
  static ThreadPool* instance(int workers);

  std::vector<std::thread> threads_;
  std::mutex mu_;
  std::condition_variable wake_, done_;
  const Job* job_ = nullptr;
  Team* team_ = nullptr;
  int active_ = 0;      // workers taking part in the current job
  long generation_ = 0;
  int pending_ = 0;     // workers still running the current job
  bool stop_ = false;
};

}  // namespace fusedrnn
