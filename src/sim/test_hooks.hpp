// Test hooks of the distributed backends, for the rank-fault tests only. They are read once, when a
// rank starts (TestHooks::fromEnvironment), and act on the named rank at the start of its first mesh
// run, after the rendezvous; the normal path never looks at the environment again.
//   MOE_LBCHECK_TEST_EXIT_RANK=r   rank r exits at once with code 9 (a rank that exits)
//   MOE_LBCHECK_TEST_CRASH_RANK=r  rank r aborts (SIGABRT: a rank that crashes)
//   MOE_LBCHECK_TEST_HANG_RANK=r   rank r sleeps forever (a rank that hangs)
//   MOE_LBCHECK_TEST_DUMP_MESH_RUNS=DIR  rank 0 writes DIR/mesh_run_<i>.json: the knobs and the
//                                  gathered gradients of mesh run i (float64, round-trip exact)
#pragma once

#include <optional>
#include <string>

namespace moe {

struct TestHooks {
  std::optional<int> exit_rank, crash_rank, hang_rank;
  std::string dump_mesh_runs_dir;

  static const TestHooks& fromEnvironment();
  // Exits, aborts or hangs when `rank` is named by a hook; returns otherwise.
  void applyAtFirstMeshRun(int rank) const;
};

}  // namespace moe
