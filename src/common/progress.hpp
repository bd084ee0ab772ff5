// A process-wide progress counter. Long computations (the reference's per-token loops, the rank
// program's schedule steps) advance it as they finish units of work; a watchdog that samples it tells
// a process that is working, however slowly, from one that is stuck. It guarantees only that the count
// never decreases; the units are not comparable between phases.
#pragma once

#include <atomic>
#include <cstdint>

namespace moe::progress {

inline std::atomic<std::uint64_t>& counter() noexcept {
  static std::atomic<std::uint64_t> count{0};
  return count;
}

// Records that `units` more units of work are done (relaxed: only monotonicity is promised).
inline void advance(std::uint64_t units = 1) noexcept { counter().fetch_add(units, std::memory_order_relaxed); }

// The units done so far in this process.
inline std::uint64_t count() noexcept { return counter().load(std::memory_order_relaxed); }

}  // namespace moe::progress
