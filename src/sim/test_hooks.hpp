// Test hooks of the distributed backends, for the rank-fault tests only. They are read once, when a
// rank starts (TestHooks::fromEnvironment), and act on the named rank at the start of its first mesh
// run, after the rendezvous; the normal path never looks at the environment again.
//   MOE_LBCHECK_TEST_EXIT_RANK=r   rank r exits at once with code 9 (a rank that exits)
//   MOE_LBCHECK_TEST_CRASH_RANK=r  rank r aborts (SIGABRT: a rank that crashes)
//   MOE_LBCHECK_TEST_SEGV_RANK=r   rank r dereferences null (SIGSEGV: a rank that crashes)
//   MOE_LBCHECK_TEST_KILL_RANK=r   rank r sends itself SIGKILL (a rank the OOM killer takes)
//   MOE_LBCHECK_TEST_HANG_RANK=r   rank r sleeps forever (a rank that hangs; the others are then in a
//                                  collective with it)
// and, on rank 0 before it posts its first mesh run (where it computes the reference while the other
// ranks wait for its command):
//   MOE_LBCHECK_TEST_STALL_RANK0=1     rank 0 sleeps forever: alive, outside any collective, no progress
//   MOE_LBCHECK_TEST_SLOW_RANK0_S=T    rank 0 works T more seconds, advancing its progress counter (a
//                                      long legitimate phase, which must not be taken for a hang)
//   MOE_LBCHECK_TEST_DUMP_MESH_RUNS=DIR  rank 0 writes DIR/mesh_run_<i>.json: the knobs and the
//                                  gathered gradients of mesh run i (float64, round-trip exact)
#pragma once

#include <optional>
#include <string>

namespace moe {

struct TestHooks {
  std::optional<int> exit_rank, crash_rank, segv_rank, kill_rank, hang_rank;
  bool stall_rank0 = false;
  double slow_rank0_s = 0.0;
  std::string dump_mesh_runs_dir;

  static const TestHooks& fromEnvironment();
  // Exits, aborts, crashes or hangs when `rank` is named by a hook; returns otherwise.
  void applyAtFirstMeshRun(int rank) const;
  // Rank 0, before its first command: stalls or works slowly when asked; returns otherwise.
  void applyBeforeFirstCommand(int rank) const;
};

}  // namespace moe
