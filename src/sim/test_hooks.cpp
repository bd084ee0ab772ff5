#include "sim/test_hooks.hpp"

#include <unistd.h>

#include <chrono>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <thread>

#include "common/progress.hpp"

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
    h.segv_rank = envRank("MOE_LBCHECK_TEST_SEGV_RANK");
    h.kill_rank = envRank("MOE_LBCHECK_TEST_KILL_RANK");
    h.hang_rank = envRank("MOE_LBCHECK_TEST_HANG_RANK");
    h.stall_rank0 = envRank("MOE_LBCHECK_TEST_STALL_RANK0").value_or(0) != 0;
    if (const char* s = std::getenv("MOE_LBCHECK_TEST_SLOW_RANK0_S"); s != nullptr) h.slow_rank0_s = std::atof(s);
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
  if (segv_rank == rank) {
    std::fprintf(stderr, "moe-lbcheck: test hook: rank %d crashes (SIGSEGV)\n", rank);
    std::fflush(stderr);
    std::raise(SIGSEGV);
  }
  if (kill_rank == rank) {
    std::fprintf(stderr, "moe-lbcheck: test hook: rank %d is killed (SIGKILL)\n", rank);
    std::fflush(stderr);
    std::raise(SIGKILL);
  }
  if (hang_rank == rank) {
    std::fprintf(stderr, "moe-lbcheck: test hook: rank %d hangs\n", rank);
    std::fflush(stderr);
    for (;;) pause();
  }
}

void TestHooks::applyBeforeFirstCommand(int rank) const {
  if (rank != 0) return;
  if (slow_rank0_s > 0) {
    std::fprintf(stderr, "moe-lbcheck: test hook: rank 0 works %.3g s more before its first mesh run\n",
                 slow_rank0_s);
    std::fflush(stderr);
    const auto until = std::chrono::steady_clock::now() + std::chrono::duration<double>(slow_rank0_s);
    while (std::chrono::steady_clock::now() < until) {
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
      progress::advance();
    }
  }
  if (stall_rank0) {
    std::fprintf(stderr, "moe-lbcheck: test hook: rank 0 stalls outside any collective\n");
    std::fflush(stderr);
    for (;;) pause();
  }
}

}  // namespace moe
