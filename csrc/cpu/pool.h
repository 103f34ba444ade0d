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
//
// Wake-up placement (Linux): on a virtual machine an idle virtual CPU is
// halted, and the scheduler then counts it as busy and wakes a worker on the
// caller's own CPU. Two threads that meet at a barrier every step then share
// one CPU and run several times slower than one thread (on the 2-CPU
// development VM an LSTM forward that takes 1.2 ms back to back took 6.7 ms
// after 0.3 s idle; torch.nn's slowed likewise). So before waking the
// workers the caller binds each to one CPU of its own allowed set other than
// its own (the worker's last CPU when it can), and each worker, once
// running, widens its binding back to that whole set: the binding steers the
// wake-up only, and the scheduler stays free to move the thread afterwards.
// Jobs that follow the last one within 100 µs skip this (about 4 µs): the
// workers' CPUs have not been idle long enough to be halted.
#pragma once

#if defined(__linux__)
#include <sched.h>
#endif

#include <atomic>
#include <chrono>
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
  void place(int workers);  // wake-up placement of workers 1 .. workers (see above)

  std::vector<std::thread> threads_;
  std::mutex mu_;
  std::condition_variable wake_, done_;
  const Job* job_ = nullptr;
  Team* team_ = nullptr;
  int active_ = 0;      // workers taking part in the current job
  long generation_ = 0;
  int pending_ = 0;     // workers still running the current job
  bool stop_ = false;
#if defined(__linux__)
  std::vector<int> last_cpu_;     // [tid - 1]: the CPU a worker ended its last job on, or -1
  std::vector<char> pinned_;      // [tid - 1]: bound to one CPU for this wake-up
  cpu_set_t allowed_;             // the caller's allowed CPUs for this job
  std::chrono::steady_clock::time_point last_end_{};  // when the last job ended
#endif
};

}  // namespace fusedrnn
