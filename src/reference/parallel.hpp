// A few worker threads over an index range, for the reference's per-token loops.
#pragma once

#include <algorithm>
#include <cstdint>
#include <functional>
#include <thread>
#include <vector>

namespace moe::reference {

using Index = std::int64_t;

// Worker threads for the per-token loops: the cores, at most 16.
inline int workerCount() {
  const unsigned hw = std::thread::hardware_concurrency();
  return static_cast<int>(std::clamp(hw == 0 ? 1u : hw, 1u, 16u));
}

// While it lives, the BLAS (OpenBLAS, when that is the system BLAS) runs each call on the calling
// thread only: BLAS calls made by several workers at once would otherwise each wake OpenBLAS's own
// thread pool, and the threads would spin against each other (measured: 40% of the reference's
// time in exec_blas_async at DeepSeek-V3 size, issue 11). Restores the previous count.
class SingleThreadedBlas {
 public:
  // when = false: no change (for call sites that decide by the size of the product).
  explicit SingleThreadedBlas(bool when = true);
  ~SingleThreadedBlas();
  SingleThreadedBlas(const SingleThreadedBlas&) = delete;
  SingleThreadedBlas& operator=(const SingleThreadedBlas&) = delete;

 private:
  int previous_ = -1;
};

// A product this small (multiply-adds) runs faster on one thread than it takes OpenBLAS's pool to
// wake up and hand out the work (measured at hidden 128, 32 experts, 1024 tokens: issue 11).
constexpr double kSmallBlasWork = 1 << 26;

// Runs job(w) for w in [0, workers) at once: w = 0 on the calling thread, the others on a persistent
// pool of threads (started on first use, kept for the process), so that the many short loops of a
// small reference do not each pay for creating threads. Falls back to new threads when the pool is in
// use by another caller or the process was forked after the pool started.
void runOnWorkers(int workers, const std::function<void(int)>& job);

// Runs fn(begin, end, worker) over [0, count) on up to `workers` threads. Every element is written by
// exactly one worker and nothing is reduced across workers here, so the results do not depend on the
// thread count. With several workers the BLAS is single-threaded meanwhile (SingleThreadedBlas).
template <typename Fn>
void parallelFor(Index count, int workers, Fn fn) {
  workers = static_cast<int>(std::max<Index>(1, std::min<Index>(workers, count)));
  if (workers == 1) {
    fn(Index{0}, count, 0);
    return;
  }
  const SingleThreadedBlas blas_on_the_workers;
  const Index chunk = (count + workers - 1) / workers;
  runOnWorkers(workers, [&](int w) {
    const Index begin = w * chunk, end = std::min(count, begin + chunk);
    if (begin < end) fn(begin, end, w);
  });
}

}  // namespace moe::reference
