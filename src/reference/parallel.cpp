#include "reference/parallel.hpp"

#include <unistd.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <mutex>
#include <thread>
#include <vector>

#include "common/blas_threads.hpp"

namespace moe::reference {

SingleThreadedBlas::SingleThreadedBlas(bool when) {
  if (!when || blasThreads() <= 1) return;
  previous_ = setBlasThreads(1);
}

SingleThreadedBlas::~SingleThreadedBlas() {
  if (previous_ > 1) setBlasThreads(previous_);
}

namespace {

// A short spin before a worker sleeps (and before the caller sleeps waiting for the workers): the
// reference's parallel loops come in quick succession, and a futex wake-up costs tens of microseconds
// in a VM, against loops of a few hundred at small sizes. Bounded, so idle workers stop using the CPU
// within about 50 microseconds.
constexpr std::chrono::microseconds kSpin{50};

// Spins until done() or kSpin has passed; true when done() became true.
template <typename Done>
bool spinUntil(Done done) {
  const auto deadline = std::chrono::steady_clock::now() + kSpin;
  for (;;) {
    for (int i = 0; i < 64; ++i) {
      if (done()) return true;
#if defined(__x86_64__) || defined(__i386__)
      __builtin_ia32_pause();
#endif
    }
    if (std::chrono::steady_clock::now() >= deadline) return done();
  }
}

class WorkerPool {
 public:
  ~WorkerPool() {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      stop_ = true;
      generation_.fetch_add(1);
    }
    wake_.notify_all();
    for (auto& t : threads_) t.join();
  }

  // False when another caller holds the pool (or it belongs to the parent of a fork).
  bool tryRun(int workers, const std::function<void(int)>& job) {
    std::unique_lock<std::mutex> caller(caller_mutex_, std::try_to_lock);
    if (!caller.owns_lock()) return false;
    if (owner_ == 0) owner_ = ::getpid();
    if (owner_ != ::getpid()) return false;
    const int helpers = workers - 1;
    while (static_cast<int>(threads_.size()) < helpers) {
      const int id = static_cast<int>(threads_.size()) + 1;
      threads_.emplace_back([this, id] { loop(id); });
    }
    {
      std::lock_guard<std::mutex> lock(mutex_);
      job_ = &job;
      active_ = helpers;
      pending_.store(helpers);
      generation_.fetch_add(1);
    }
    wake_.notify_all();
    job(0);
    spinUntil([&] { return pending_.load() == 0; });
    std::unique_lock<std::mutex> lock(mutex_);
    done_.wait(lock, [&] { return pending_.load() == 0; });
    job_ = nullptr;
    return true;
  }

 private:
  void loop(int id) {
    std::uint64_t seen = 0;
    for (;;) {
      spinUntil([&] { return generation_.load() != seen; });
      std::unique_lock<std::mutex> lock(mutex_);
      wake_.wait(lock, [&] { return stop_ || generation_.load() != seen; });
      if (stop_) return;
      seen = generation_.load();
      if (id > active_) continue;
      const std::function<void(int)>* job = job_;
      lock.unlock();
      (*job)(id);
      lock.lock();
      if (pending_.fetch_sub(1) == 1) done_.notify_one();
    }
  }

  std::mutex caller_mutex_;  // one parallel loop at a time
  std::mutex mutex_;         // guards job_, active_, stop_ and the sleeping side of the counters
  std::condition_variable wake_, done_;
  std::vector<std::thread> threads_;
  const std::function<void(int)>* job_ = nullptr;
  std::atomic<std::uint64_t> generation_{0};
  std::atomic<int> pending_{0};
  int active_ = 0;
  bool stop_ = false;
  pid_t owner_ = 0;
};

}  // namespace

void runOnWorkers(int workers, const std::function<void(int)>& job) {
  static WorkerPool pool;
  if (workers <= 1) {
    job(0);
    return;
  }
  if (pool.tryRun(workers, job)) return;
  std::vector<std::thread> threads;
  for (int w = 1; w < workers; ++w) threads.emplace_back([&job, w] { job(w); });
  job(0);
  for (auto& t : threads) t.join();
}

}  // namespace moe::reference
