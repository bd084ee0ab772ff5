// A few worker threads over an index range, for the reference's per-token loops.
#pragma once

#include <algorithm>
#include <cstdint>
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
  SingleThreadedBlas();
  ~SingleThreadedBlas();
  SingleThreadedBlas(const SingleThreadedBlas&) = delete;
  SingleThreadedBlas& operator=(const SingleThreadedBlas&) = delete;

 private:
  int previous_ = -1;
};

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
  std::vector<std::thread> threads;
  const Index chunk = (count + workers - 1) / workers;
  for (int w = 0; w < workers; ++w) {
    const Index begin = w * chunk, end = std::min(count, begin + chunk);
    if (begin >= end) break;
    threads.emplace_back([=, &fn] { fn(begin, end, w); });
  }
  for (auto& th : threads) th.join();
}

}  // namespace moe::reference
