// One region of huge pages for the buffers of a small reference (issue 11, item 4). In a fresh process
// every page a buffer touches is a page fault, and at hidden 128, 32 experts, 1024 tokens the ~1200
// faults of 4 KiB pages were 15-20% of the reference's time (perf, bench/RESULTS.md); from one 2 MiB-
// aligned region advised MADV_HUGEPAGE the same buffers take a few faults. Only small references use
// it (see ReferenceArenaScope): at large sizes faults are a small share of the time, and rounding
// blocks up to 2 MiB there raised the DeepSeek-V3-size run's peak RSS over its bound.
#pragma once

#include <cstddef>

namespace moe::reference {

// While one lives, allocations of FilledLater buffers (layer_cache.hpp) made on the thread that
// created it are carved from its region, until the region is full (then they fall back to the
// heap). Blocks are never reused; the region is unmapped when the scope ends, so every buffer taken
// from it must be destroyed before then (computeReference creates the scope before its forward
// cache). At most one scope is active in the process: a second one, on another thread, is inactive.
// Deallocation of a block from the region is a no-op on any thread.
class ReferenceArenaScope {
 public:
  // `bytes`: the buffers' expected total; no region when it is 0 or above kMaxBytes.
  explicit ReferenceArenaScope(std::size_t bytes);
  ~ReferenceArenaScope();
  ReferenceArenaScope(const ReferenceArenaScope&) = delete;
  ReferenceArenaScope& operator=(const ReferenceArenaScope&) = delete;
  bool active() const { return active_; }

  // The largest total that gets a region: below it the region's rounding up to whole huge pages costs
  // at most one 2 MiB page of RSS on top of a small run's ~200 MB.
  static constexpr std::size_t kMaxBytes = std::size_t(64) << 20;

 private:
  bool active_ = false;
};

// A block of `bytes` from the active region when called on its thread and the region has room, else
// nullptr.
void* takeFromReferenceArena(std::size_t bytes) noexcept;
// Whether `p` lies in the active region (its blocks are released with the region).
bool inReferenceArena(const void* p) noexcept;

}  // namespace moe::reference
