#include "reference/arena.hpp"

#include <sys/mman.h>

#include <atomic>
#include <cstdint>
#include <thread>

namespace moe::reference {
namespace {

constexpr std::size_t kHugePage = std::size_t(2) << 20;
constexpr std::size_t kAlignment = 64;  // a cache line: no false sharing between buffers

struct Region {
  char* mapping = nullptr;  // as returned by mmap, `mapped` bytes
  std::size_t mapped = 0;
  std::atomic<char*> begin{nullptr};  // 2 MiB-aligned start of the usable part (atomic: read by any
  std::atomic<char*> end{nullptr};    // thread that frees a FilledLater block)
  std::atomic<char*> next{nullptr};
  std::atomic<std::thread::id> owner{};
};

Region g_region;
std::atomic<bool> g_in_use{false};     // one scope at a time
std::atomic<bool> g_published{false};  // g_region's bounds are valid

std::size_t roundUp(std::size_t n, std::size_t to) { return (n + to - 1) / to * to; }

}  // namespace

ReferenceArenaScope::ReferenceArenaScope(std::size_t bytes) {
  if (bytes == 0 || bytes > kMaxBytes) return;
  bool expected = false;
  if (!g_in_use.compare_exchange_strong(expected, true)) return;
  const std::size_t usable = roundUp(bytes, kHugePage);
  const std::size_t mapped = usable + kHugePage;  // room to align the start
  void* p = ::mmap(nullptr, mapped, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) {
    g_in_use.store(false);
    return;
  }
  char* base = static_cast<char*>(p);
  char* aligned = reinterpret_cast<char*>(roundUp(reinterpret_cast<std::uintptr_t>(base), kHugePage));
  // Advice only: without transparent huge pages the region is ordinary memory.
  ::madvise(aligned, usable, MADV_HUGEPAGE);
  g_region.mapping = base;
  g_region.mapped = mapped;
  g_region.begin = aligned;
  g_region.end = aligned + usable;
  g_region.next.store(aligned);
  g_region.owner.store(std::this_thread::get_id());
  g_published.store(true, std::memory_order_release);
  active_ = true;
}

ReferenceArenaScope::~ReferenceArenaScope() {
  if (!active_) return;
  g_published.store(false, std::memory_order_release);
  ::munmap(g_region.mapping, g_region.mapped);
  g_region.begin.store(nullptr);
  g_region.end.store(nullptr);
  g_region.mapping = nullptr;
  g_in_use.store(false);
}

void* takeFromReferenceArena(std::size_t bytes) noexcept {
  if (!g_published.load(std::memory_order_acquire) ||
      g_region.owner.load(std::memory_order_relaxed) != std::this_thread::get_id())
    return nullptr;
  const std::size_t size = roundUp(bytes == 0 ? 1 : bytes, kAlignment);
  char* start = g_region.next.load(std::memory_order_relaxed);
  if (size > std::size_t(g_region.end.load(std::memory_order_relaxed) - start)) return nullptr;
  g_region.next.store(start + size, std::memory_order_relaxed);  // only the owner thread takes
  return start;
}

bool inReferenceArena(const void* p) noexcept {
  if (!g_published.load(std::memory_order_acquire)) return false;
  const char* c = static_cast<const char*>(p);
  return c >= g_region.begin.load(std::memory_order_relaxed) && c < g_region.end.load(std::memory_order_relaxed);
}

}  // namespace moe::reference
