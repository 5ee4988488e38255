// What the native operators share: a thread pool (oneDNN's threadpool runtime, and the
// pointwise kernels' parallel loops), the mutex that serialises calls into it, and the error
// guard of the MindSpore aot entry points.
#pragma once

#include <sched.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <functional>
#include <map>
#include <string>
#include <mutex>
#include <thread>
#include <vector>

#include "oneapi/dnnl/dnnl.hpp"
#include "oneapi/dnnl/dnnl_threadpool.hpp"

namespace ddpm {

// A fixed pool of worker threads for oneDNN's threadpool runtime (MindSpore's libdnnl is built
// for it): without a pool the stream would run on the calling thread alone.
class ThreadPool : public dnnl::threadpool_interop::threadpool_iface {
 public:
  explicit ThreadPool(int threads) : threads_(std::max(1, threads)) {
    for (int i = 1; i < threads_; ++i) workers_.emplace_back([this] { Work(); });
  }
  ~ThreadPool() override {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      stop_ = true;
    }
    wake_.notify_all();
    for (auto &w : workers_) w.join();
  }
  int get_num_threads() const override { return threads_; }
  bool get_in_parallel() const override { return in_parallel_; }
  uint64_t get_flags() const override { return 0; }  // synchronous: parallel_for returns when done

  void parallel_for(int n, const std::function<void(int, int)> &fn) override {
    if (n <= 1 || threads_ == 1 || in_parallel_) {  // nested regions run inline
      for (int i = 0; i < n; ++i) fn(i, n);
      return;
    }
    Job job(&fn, n);
    {
      std::lock_guard<std::mutex> lock(mutex_);
      job_ = &job;
      ++generation_;
    }
    wake_.notify_all();
    in_parallel_ = true;  // the caller works too
    int done = RunTasks(job);
    in_parallel_ = false;
    std::unique_lock<std::mutex> lock(mutex_);
    job.pending -= done;
    job_ = nullptr;  // no worker joins the job after this; wait for those inside it
    finished_.wait(lock, [&] { return job.pending == 0 && job.active == 0; });
  }

 private:
  // One parallel_for; it lives on the caller's stack until no worker touches it any more.
  struct Job {
    Job(const std::function<void(int, int)> *f, int size) : fn(f), n(size), pending(size) {}
    const std::function<void(int, int)> *fn;
    int n;
    std::atomic<int> next{0};
    int pending;     // tasks not yet finished; guarded by mutex_
    int active = 0;  // workers inside the job; guarded by mutex_
  };

  static int RunTasks(Job &job) {
    int done = 0;
    for (int i = job.next.fetch_add(1); i < job.n; i = job.next.fetch_add(1), ++done) (*job.fn)(i, job.n);
    return done;
  }

  void Work() {
    in_parallel_ = true;
    uint64_t seen = 0;
    std::unique_lock<std::mutex> lock(mutex_);
    for (;;) {
      wake_.wait(lock, [&] { return stop_ || generation_ != seen; });
      if (stop_) return;
      seen = generation_;
      Job *job = job_;
      if (job == nullptr) continue;  // the caller finished it alone
      ++job->active;
      lock.unlock();
      int done = RunTasks(*job);
      lock.lock();
      job->pending -= done;
      --job->active;
      finished_.notify_all();
    }
  }

  const int threads_;
  std::vector<std::thread> workers_;
  std::mutex mutex_;
  std::condition_variable wake_, finished_;
  Job *job_ = nullptr;
  uint64_t generation_ = 0;
  bool stop_ = false;
  static inline thread_local bool in_parallel_ = false;
};

inline int UsableCpus() {
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof(set), &set) != 0) return 1;
  return CPU_COUNT(&set);
}

// The process's one pool, sized to the CPUs this process may run on (taskset, cgroups).
inline ThreadPool &SharedPool() {
  static ThreadPool pool(UsableCpus());
  return pool;
}

// MindSpore may launch independent kernels from several threads; the pool runs one job at a time.
inline std::mutex &CallMutex() {
  static std::mutex mutex;
  return mutex;
}

inline bool AllFloat32(int nparam, const char **dtypes) {
  for (int i = 0; i < nparam; ++i) {
    if (std::strcmp(dtypes[i], "float32") != 0) return false;
  }
  return true;
}

inline int64_t Elements(int ndim, const int64_t *shape) {
  int64_t n = 1;
  for (int d = 0; d < ndim; ++d) n *= shape[d];
  return n;
}

inline int Fail(const char *op, const char *what) {
  std::fprintf(stderr, "ddpm native kernel %s: %s\n", op, what);
  return 1;
}

// DDPM_KERNEL_PROFILE=1: wall time per operator (and shape class), printed to stderr at exit.
// A diagnostic: MindSpore's profiler names every custom operator just "Custom".
class KernelProfile {
 public:
  static KernelProfile &Get() {
    static KernelProfile profile;
    return profile;
  }
  bool enabled() const { return enabled_; }
  void Add(const std::string &key, double seconds) {  // under the call mutex
    Entry &e = entries_[key];
    ++e.calls;
    e.seconds += seconds;
  }
  ~KernelProfile() {
    if (!enabled_) return;
    std::vector<std::pair<std::string, Entry>> sorted(entries_.begin(), entries_.end());
    std::sort(sorted.begin(), sorted.end(), [](auto &a, auto &b) { return a.second.seconds > b.second.seconds; });
    std::fprintf(stderr, "ddpm native kernels (DDPM_KERNEL_PROFILE): operator, calls, total ms\n");
    for (auto &[key, e] : sorted) std::fprintf(stderr, "  %-40s %8ld %10.1f\n", key.c_str(), e.calls, e.seconds * 1e3);
  }

 private:
  struct Entry {
    long calls = 0;
    double seconds = 0.0;
  };
  KernelProfile() {
    const char *value = std::getenv("DDPM_KERNEL_PROFILE");
    enabled_ = value != nullptr && std::string(value) == "1";
  }
  bool enabled_ = false;
  std::map<std::string, Entry> entries_;
};

// Runs `fn` under the call mutex; an exception becomes MindSpore's non-zero return. `label`
// names the call in the DDPM_KERNEL_PROFILE summary (default: the operator).
template <typename Fn>
int Guarded(const char *op, Fn fn, const std::string &label = {}) {
  try {
    std::lock_guard<std::mutex> lock(CallMutex());
    KernelProfile &profile = KernelProfile::Get();
    if (!profile.enabled()) {
      fn();
      return 0;
    }
    const auto start = std::chrono::steady_clock::now();
    fn();
    profile.Add(label.empty() ? op : label, std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
    return 0;
  } catch (const std::exception &e) {
    return Fail(op, e.what());
  }
}

// fn(begin, end) over [0, n) in contiguous chunks, one per thread of the pool.
inline void ParallelRange(int64_t n, const std::function<void(int64_t, int64_t)> &fn) {
  ThreadPool &pool = SharedPool();
  int chunks = static_cast<int>(std::min<int64_t>(pool.get_num_threads(), n));
  if (chunks <= 1) {
    if (n > 0) fn(0, n);
    return;
  }
  pool.parallel_for(chunks, [&](int i, int count) { fn(n * i / count, n * (i + 1) / count); });
}

}  // namespace ddpm
