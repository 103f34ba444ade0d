// fusedrnn: a persistent thread pool with a per-step barrier.
//
// One job at a time: run(n, fn) calls fn(tid, n) on n threads (the caller is
// tid 0) and returns when all are done. Inside fn, Team::barrier() syncs the
// n threads (a spinning sense-reversing barrier: one per recurrent step costs
// well under a microsecond). Idle workers sleep on a condition variable, so
// they do not compete with BLAS threads between jobs; first they spin for up
// to 100 µs after a job for the next one, and the caller spins as long for
// the workers' end of a job (pool.cpp, kSpin: a wake-up costs more than that).
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
//
// OpenMP (Linux): when the process has loaded an OpenMP runtime (torch does),
// jobs run on its threads instead (GOMP_parallel, looked up at run time;
// fusedrnn does not link one). After its own parallel work (every torch op
// on CPU tensors of some size) the runtime's threads spin for milliseconds
// before they sleep; fusedrnn's own threads would then share the cores with
// them, and a layer right after a torch op ran about 2x slower. The same
// wake-up placement applies to the OpenMP threads of the caller's team, by
// their kernel thread ids, and a thread bound for a wake-up that did not run
// the job is unbound by the caller afterwards. Not inside an OpenMP parallel
// region, nor in a child after fork(); FUSEDRNN_OPENMP=0 turns it off.
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

// Wake-up placement of a job's workers 0 .. workers-1 (tid 1 ..): see above.
// Used with *g_busy held (one job at a time).
class Placement {
 public:
  void resize(size_t workers);
  // Before waking: binds each worker to one CPU by bind(k, cpu set) (false:
  // not bound), unless the last job ended less than 100 µs ago.
  template <typename Bind>
  void place(int workers, Bind&& bind);
  // On worker k, first thing: widen its binding again. Returns whether it was bound.
  bool widen(int k);
  // On worker k, last thing: the CPU it ends on (where the next job prefers it).
  void ended(int k);
  void job_done();
  bool pinned(int k) const { return k < int(pinned_.size()) && pinned_[size_t(k)]; }
#if defined(__linux__)
  const cpu_set_t& allowed() const { return allowed_; }

 private:
  int choose(int k, cpu_set_t* used, int* next) const;
  std::vector<int> last_cpu_;  // [k]: the CPU worker k ended its last job on, or -1
  std::vector<char> pinned_;   // [k]: bound to one CPU for this wake-up
  cpu_set_t allowed_;          // the caller's allowed CPUs for this job
  std::chrono::steady_clock::time_point last_end_{};  // when the last job ended
#else
 private:
  std::vector<char> pinned_;
#endif
};

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
  // written under mu_; read without it too (the spin before sleeping)
  std::atomic<long> generation_{0};
  std::atomic<int> pending_{0};  // workers still running the current job
  bool stop_ = false;
  Placement placement_;  // worker k is tid k + 1
};

}  // namespace fusedrnn
