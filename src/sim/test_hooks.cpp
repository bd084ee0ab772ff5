#include "sim/test_hooks.hpp"

#include <unistd.h>

#include <cstdio>
#include <cstdlib>

namespace moe {
namespace {

std::optional<int> envRank(const char* name) {
  const char* v = std::getenv(name);
  if (v == nullptr || *v == '\0') return std::nullopt;
  char* end = nullptr;
  const long r = std::strtol(v, &end, 10);
  if (*end != '\0') return std::nullopt;
  return static_cast<int>(r);
}

}  // namespace

const TestHooks& TestHooks::fromEnvironment() {
  static const TestHooks hooks = [] {
    TestHooks h;
    h.exit_rank = envRank("MOE_LBCHECK_TEST_EXIT_RANK");
    h.crash_rank = envRank("MOE_LBCHECK_TEST_CRASH_RANK");
    h.hang_rank = envRank("MOE_LBCHECK_TEST_HANG_RANK");
    if (const char* dir = std::getenv("MOE_LBCHECK_TEST_DUMP_MESH_RUNS"); dir != nullptr) h.dump_mesh_runs_dir = dir;
    return h;
  }();
  return hooks;
}

void TestHooks::applyAtFirstMeshRun(int rank) const {
  if (exit_rank == rank) {
    std::fprintf(stderr, "moe-lbcheck: test hook: rank %d exits with code 9\n", rank);
    std::fflush(stderr);
    std::_Exit(9);
  }
  if (crash_rank == rank) {
    std::fprintf(stderr, "moe-lbcheck: test hook: rank %d aborts\n", rank);
    std::fflush(stderr);
    std::abort();
  }
  if (hang_rank == rank) {
    std::fprintf(stderr, "moe-lbcheck: test hook: rank %d hangs\n", rank);
    std::fflush(stderr);
    for (;;) pause();
  }
}

}  // namespace moe
