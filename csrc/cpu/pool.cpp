// fusedrnn: persistent thread pool (see pool.h).
#include "pool.h"

#include "fusedrnn/rnn.h"

#include <pthread.h>
#include <sched.h>
#include <unistd.h>

#if defined(__linux__)
#include <dlfcn.h>
#include <link.h>
#include <sys/syscall.h>
#endif

#include <algorithm>
#include <cstddef>
#include <cstdlib>
#include <cstring>
#include <new>
#include <string>

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

// ------------------------------------------------------------ placement

void Placement::resize(size_t workers) {
#if defined(__linux__)
  if (last_cpu_.size() < workers) last_cpu_.resize(workers, -1);
  if (pinned_.empty()) CPU_ZERO(&allowed_);
#endif
  if (pinned_.size() < workers) pinned_.resize(workers, 0);
}

#if defined(__linux__)
// The CPU for worker k: its last one if free, else the next free one after
// *next (cyclically); -1 if none. Marks it used.
int Placement::choose(int k, cpu_set_t* used, int* next) const {
  int cpu = last_cpu_[size_t(k)];
  if (cpu < 0 || cpu >= CPU_SETSIZE || !CPU_ISSET(cpu, &allowed_) || CPU_ISSET(cpu, used)) {
    cpu = -1;
    for (int i = 1; i <= CPU_SETSIZE && cpu < 0; ++i) {
      const int c = (*next + i) % CPU_SETSIZE;
      if (CPU_ISSET(c, &allowed_) && !CPU_ISSET(c, used)) cpu = c;
    }
    if (cpu < 0) return -1;
    *next = cpu;
  }
  CPU_SET(cpu, used);
  return cpu;
}
#endif

template <typename Bind>
void Placement::place(int workers, Bind&& bind) {
  std::fill(pinned_.begin(), pinned_.end(), 0);
#if defined(__linux__)
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
    const int cpu = choose(k, &used, &next);
    if (cpu < 0) break;
    cpu_set_t one;
    CPU_ZERO(&one);
    CPU_SET(cpu, &one);
    pinned_[size_t(k)] = bind(k, one);
  }
#else
  (void)workers;
  (void)bind;
#endif
}

bool Placement::widen(int k) {
  if (!pinned(k)) return false;
#if defined(__linux__)
  sched_setaffinity(0, sizeof allowed_, &allowed_);  // this thread
#endif
  return true;
}

void Placement::ended(int k) {
#if defined(__linux__)
  if (k < int(last_cpu_.size())) last_cpu_[size_t(k)] = sched_getcpu();
#else
  (void)k;
#endif
}

void Placement::job_done() {
#if defined(__linux__)
  last_end_ = std::chrono::steady_clock::now();
#endif
}

namespace {

// The pool in use, its owner process, and the lock a job holds. All three are
// reset in a forked child, whose copy of the pool has no threads.
ThreadPool* g_pool = nullptr;
int g_pool_workers = 0;
std::mutex* g_busy = new std::mutex;

// OpenMP's entry points, when the process has loaded GNU OpenMP (libgomp,
// which torch's CPU builds ship) or a runtime that provides the same entry
// points (Intel's, LLVM's).
struct OpenMP {
  void (*parallel)(void (*fn)(void*), void* data, unsigned num_threads, unsigned flags);
  int (*thread_num)();
  int (*num_threads)();
  int (*in_parallel)();
};
std::atomic<const OpenMP*> g_openmp{nullptr};
std::atomic<const char*> g_backend{""};  // threads_backend()
std::atomic<bool> g_openmp_off{false};  // in a forked child, or FUSEDRNN_OPENMP=0

void reset_after_fork() {
  g_pool = nullptr;  // the parent's threads do not exist here: leak, never join
  g_pool_workers = 0;
  g_busy = new (std::nothrow) std::mutex;
  // The parent's OpenMP threads do not exist here either, and OpenMP's
  // runtime is not usable after fork: the child uses fusedrnn's own threads.
  g_openmp_off.store(true);
}

struct ForkHook {
  ForkHook() { pthread_atfork(nullptr, nullptr, reset_after_fork); }
} g_fork_hook;

#if defined(__linux__)
struct OpenMPSearch {
  unsigned long long adds;  // objects loaded so far, at the last search (dlpi_adds)
  bool first;
  bool unchanged;
  std::string path;
};

// dl_iterate_phdr callback: stops at once when no object was loaded since the
// last search, else at the first OpenMP runtime.
int find_openmp_library(struct dl_phdr_info* info, size_t size, void* out) {
  OpenMPSearch& s = *static_cast<OpenMPSearch*>(out);
  if (s.first) {
    s.first = false;
    if (size >= offsetof(struct dl_phdr_info, dlpi_adds) + sizeof info->dlpi_adds) {
      if (info->dlpi_adds == s.adds) {
        s.unchanged = true;
        return 1;
      }
      s.adds = info->dlpi_adds;
    }
  }
  const char* name = info->dlpi_name;
  const char* base = name ? std::strrchr(name, '/') : nullptr;
  base = base ? base + 1 : name;
  if (base && (!std::strncmp(base, "libgomp", 7) || !std::strncmp(base, "libiomp5", 8) ||
               !std::strncmp(base, "libomp", 6))) {
    s.path = name;
    return 1;
  }
  return 0;
}
#endif

// The OpenMP runtime the process has loaded, or nullptr. Looked up again
// (only for jobs of several threads, with *g_busy held) whenever objects
// were loaded since the last look, until one is found, then kept: torch may
// be imported after fusedrnn.
const OpenMP* openmp() {
  if (g_openmp_off.load()) return nullptr;
  if (const OpenMP* o = g_openmp.load(std::memory_order_acquire)) return o;
#if defined(__linux__)
  static const bool disabled = [] {
    const char* e = std::getenv("FUSEDRNN_OPENMP");
    return e && std::strcmp(e, "0") == 0;
  }();
  if (disabled) return nullptr;
  static OpenMPSearch search{~0ull, true, false, {}};
  search.first = true;
  search.unchanged = false;
  search.path.clear();
  dl_iterate_phdr(find_openmp_library, &search);
  if (search.unchanged || search.path.empty()) return nullptr;
  void* h = dlopen(search.path.c_str(), RTLD_NOW | RTLD_NOLOAD);  // loaded: no new copy
  if (!h) return nullptr;
  OpenMP o;
  o.parallel = reinterpret_cast<decltype(o.parallel)>(dlsym(h, "GOMP_parallel"));
  o.thread_num = reinterpret_cast<decltype(o.thread_num)>(dlsym(h, "omp_get_thread_num"));
  o.num_threads = reinterpret_cast<decltype(o.num_threads)>(dlsym(h, "omp_get_num_threads"));
  o.in_parallel = reinterpret_cast<decltype(o.in_parallel)>(dlsym(h, "omp_in_parallel"));
  if (!o.parallel || !o.thread_num || !o.num_threads || !o.in_parallel) {
    dlclose(h);
    return nullptr;
  }
  static OpenMP found = o;  // the handle stays open: the runtime stays loaded
  g_openmp.store(&found, std::memory_order_release);
  return &found;
#else
  return nullptr;
#endif
}

// The OpenMP team of the last job: its caller, and for each worker its
// kernel thread id (0: unknown) and placement. Used with *g_busy held.
// Only threads that may run wherever the caller may are placed: a binding of
// the user's (OMP_PROC_BIND, GOMP_CPU_AFFINITY, ...) is left alone.
struct OpenMPTeam {
  pthread_t caller{};
  std::vector<long> tid;      // [k]: team thread k + 1 in the last job
  std::vector<char> free;     // [k]: ... and its CPUs were the caller's then
  std::vector<long> tid_now;  // written by the threads of the current job
  std::vector<char> free_now;
  std::vector<char> widened;  // [k]: thread k + 1 of the current job undid its binding
#if defined(__linux__)
  cpu_set_t caller_cpus;      // the caller's allowed CPUs for the current job
#endif
  Placement placement;
} g_omp_team;

struct OpenMPJob {
  const ThreadPool::Job* job;
  Team* team;
  const OpenMP* omp;
};

long this_thread_id() {
#if defined(__linux__)
  return long(syscall(SYS_gettid));
#else
  return 0;
#endif
}

#if defined(__linux__)
// Whether kernel thread id t is a thread of this process (ids are reused).
bool own_thread(long t) {
  return t > 0 && syscall(SYS_tgkill, long(getpid()), t, 0) == 0;
}
#endif

// Runs on each thread of the OpenMP team. A team of another size than asked
// for (an OpenMP thread limit) runs the job on its first thread alone.
void openmp_trampoline(void* p) {
  const OpenMPJob& j = *static_cast<const OpenMPJob*>(p);
  const int tid = j.omp->thread_num();
  OpenMPTeam& rec = g_omp_team;
  if (tid > 0 && tid <= int(rec.tid_now.size())) {
    rec.widened[size_t(tid - 1)] = rec.placement.widen(tid - 1);
    rec.tid_now[size_t(tid - 1)] = this_thread_id();
  }
  if (j.omp->num_threads() != j.team->size()) {
    if (tid == 0) {
      Team alone(1);
      (*j.job)(0, alone);
    }
    return;
  }
  (*j.job)(tid, *j.team);
  if (tid > 0 && tid <= int(rec.tid_now.size())) {
    rec.placement.ended(tid - 1);
#if defined(__linux__)
    cpu_set_t mine;
    rec.free_now[size_t(tid - 1)] = sched_getaffinity(0, sizeof mine, &mine) == 0 &&
                                    CPU_EQUAL(&mine, &rec.caller_cpus);
#endif
  }
}

// A job on the OpenMP team of n threads, with wake-up placement of the
// threads that ran the caller's last job.
void run_openmp(const OpenMP* omp, int n, const ThreadPool::Job& job) {
  OpenMPTeam& rec = g_omp_team;
  const size_t workers = size_t(n - 1);
  const pthread_t me = pthread_self();
  if (!pthread_equal(rec.caller, me)) {  // another caller's team: its threads are not ours
    rec.tid.assign(rec.tid.size(), 0);
    rec.caller = me;
  }
  if (rec.tid.size() < workers) {
    rec.tid.resize(workers, 0);
    rec.free.resize(workers, 0);
  }
  rec.tid_now.assign(rec.tid.size(), 0);
  rec.free_now.assign(rec.tid.size(), 0);
  rec.widened.assign(rec.tid.size(), 0);
  rec.placement.resize(rec.tid.size());
#if defined(__linux__)
  if (sched_getaffinity(0, sizeof rec.caller_cpus, &rec.caller_cpus) != 0)
    CPU_ZERO(&rec.caller_cpus);
  rec.placement.place(int(workers), [&](int k, const cpu_set_t& one) {
    const long t = rec.tid[size_t(k)];
    return rec.free[size_t(k)] && own_thread(t) &&
           sched_setaffinity(pid_t(t), sizeof one, &one) == 0;
  });
#endif
  Team team(n);
  OpenMPJob j{&job, &team, omp};
  omp->parallel(openmp_trampoline, &j, unsigned(n), 0);
  for (size_t k = 0; k < workers; ++k) {
#if defined(__linux__)
    // a thread bound for this wake-up that did not run the job: unbind it
    if (rec.placement.pinned(int(k)) && !rec.widened[k] && own_thread(rec.tid[k]))
      sched_setaffinity(pid_t(rec.tid[k]), sizeof(cpu_set_t), &rec.placement.allowed());
#endif
    rec.tid[k] = rec.tid_now[k];
    rec.free[k] = rec.free_now[k];
  }
  rec.placement.job_done();
}

}  // namespace

const char* threads_backend() { return g_backend.load(); }

ThreadPool::ThreadPool(int workers) {
  placement_.resize(size_t(workers));
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

// How long a thread spins for an event that is usually imminent before it
// sleeps: a worker for the next job after its last one, the caller for the
// workers' end of a job. Waking a sleeping thread costs 15-60 µs on a virtual
// machine (its CPU halts), several times a small layer's whole call, and
// calls often follow each other closely (a training step's forward and
// backward, a benchmark's loop). Short enough not to take a core from BLAS's
// or torch's threads for long.
constexpr auto kSpin = std::chrono::microseconds(100);

// Spins until done() or kSpin has passed; returns done().
template <typename Done>
bool spin_until(Done&& done) {
  const auto end = std::chrono::steady_clock::now() + kSpin;
  for (unsigned i = 1;; ++i) {
    if (done()) return true;
    FUSEDRNN_PAUSE();
    if ((i & 63) == 0 && std::chrono::steady_clock::now() > end) return done();
  }
}

void ThreadPool::worker_loop(int tid) {
  long seen = 0;
  for (;;) {
    const Job* job;
    Team* team;
    spin_until([&] { return generation_.load(std::memory_order_acquire) != seen; });
    {
      std::unique_lock<std::mutex> lock(mu_);
      wake_.wait(lock, [&] { return stop_ || generation_ != seen; });
      if (stop_) return;
      seen = generation_;
      if (tid > active_) continue;
      job = job_;
      team = team_;
    }
    // The caller may have bound this thread to one CPU to place its wake-up
    // (written before the job was published under mu_).
    placement_.widen(tid - 1);
    (*job)(tid, *team);
    placement_.ended(tid - 1);  // read by the next job's caller
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
  // With an OpenMP runtime in the process (torch), its threads run the job:
  // after the runtime's own parallel work they spin for milliseconds before
  // sleeping, and fusedrnn's threads would share the cores with them (a
  // layer ran about 2x slower right after a torch op). They also pick up
  // the job at once. Not from inside an OpenMP parallel region.
  if (const OpenMP* omp = openmp()) {
    if (!omp->in_parallel()) {
      g_backend.store("openmp");
      run_openmp(omp, n, job);
      return n;
    }
  }
  g_backend.store("fusedrnn");
  ThreadPool* pool = instance(n - 1);
#if defined(__linux__)
  pool->placement_.place(n - 1, [&](int k, const cpu_set_t& one) {
    return pthread_setaffinity_np(pool->threads_[size_t(k)].native_handle(), sizeof one,
                                  &one) == 0;
  });
#endif
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
  spin_until([&] { return pool->pending_.load(std::memory_order_acquire) == 0; });
  std::unique_lock<std::mutex> lock(pool->mu_);
  pool->done_.wait(lock, [&] { return pool->pending_ == 0; });
  pool->placement_.job_done();
  return n;
}

}  // namespace fusedrnn
