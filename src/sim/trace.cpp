#include "sim/trace.hpp"

#include <chrono>
#include <cstdio>
#include <cstdlib>

namespace moe {

void trace(int rank, const std::string& what) {
  static const bool on = [] {
    const char* v = std::getenv("MOE_LBCHECK_DEBUG");
    return v != nullptr && std::string(v) == "1";
  }();
  if (!on) return;
  static const auto t0 = std::chrono::steady_clock::now();
  std::fprintf(stderr, "[moe-lbcheck rank %d %8.3f s] %s\n", rank,
               std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count(), what.c_str());
}

}  // namespace moe
