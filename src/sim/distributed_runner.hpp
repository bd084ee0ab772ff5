// One rank of a real (one process per rank) mesh over c10d Gloo, and the protocol that lets rank 0
// alone run the checks while every rank takes part in every mesh run.
//
// Rank 0 runs `moe-lbcheck run` as usual (runChecks: the reference, the mesh runs, the checks, the
// report); each of its mesh runs goes through runDistributedMesh, which first posts the run's knobs
// as a command in the TCPStore ("<prefix>/cmd/<i>") and then runs the rank program like every other
// rank. The other ranks (serve loop) load the same problem, wait for each command, build the same
// MeshInputs (checked against rank 0's by a fingerprint of the scenario and every input tensor),
// run the rank program and send their owned-layer gradients to rank 0; they write nothing. The
// sequence of mesh runs is therefore whatever rank 0's checks need, never duplicated here. When
// rank 0 is done it posts "done" and all ranks meet in a final barrier; when rank 0 fails it posts
// "abort" with its message and exit code, which the other ranks adopt.
//
// Gathering: the (dp 0, cp 0) rank of each pipeline stage holds the dp*cp-reduced gradients of its
// layers (as in runEmulatedMesh) and sends them to rank 0 (tag kGatherTagBase + layer).
//
// Liveness: rank 0 bumps "<prefix>/heartbeat" every 0.5 s from a thread with its own store
// connection. A rank waiting for the next command fails (exit 3) when rank 0's store is gone or its
// heartbeat stops for the timeout; a rank blocked in a collective or recv fails when the peer's
// connection closes or the timeout (MOE_LBCHECK_TIMEOUT_S, default 60 s) passes. A heartbeat shows
// rank 0 is alive, not that it progresses: a reference computation that never ends is not detected.
//
// Test hooks (for tests/torch/test_gloo.cpp only; they take effect at the start of the first mesh
// run, after the rendezvous, on the named rank):
//   MOE_LBCHECK_TEST_EXIT_RANK=r   rank r exits at once with code 9 (a rank that exits)
//   MOE_LBCHECK_TEST_CRASH_RANK=r  rank r aborts (SIGABRT: a rank that crashes)
//   MOE_LBCHECK_TEST_HANG_RANK=r   rank r sleeps forever (a rank that hangs)
//   MOE_LBCHECK_TEST_DUMP_MESH_RUNS=DIR  rank 0 writes DIR/mesh_run_<i>.json: the knobs and the
//                                  gathered gradients of mesh run i (float64, round-trip exact)
// Debugging: MOE_LBCHECK_DEBUG=1 prints one line per phase of every rank on stderr.
#pragma once

#include <chrono>
#include <functional>
#include <memory>

#include "sim/c10d_communicator.hpp"
#include "sim/launcher.hpp"
#include "sim/mesh_runner.hpp"

namespace moe {

constexpr int kGatherTagBase = 1 << 24;

class DistributedSession {
 public:
  // Collective over all ranks: connects to (rank 0: serves, unless the launcher hosts it) the
  // TCPStore at MASTER_ADDR:MASTER_PORT, checks that every rank runs the same scenario with a
  // distinct RANK, and creates the process groups. Throws UsageError for a port in use or a
  // mismatched rank, RuntimeFailure for a rendezvous that fails or times out.
  DistributedSession(const RankEnvironment& env, const Scenario& scenario,
                     std::chrono::milliseconds timeout);
  ~DistributedSession();
  DistributedSession(const DistributedSession&) = delete;
  DistributedSession& operator=(const DistributedSession&) = delete;

  int rank() const;
  int worldSize() const;
  C10dCommunicator& communicator();

  // Rank 0: one mesh run on every rank; returns the gradients gathered from the owning ranks.
  MeshGradients runLeader(const MeshInputs& inputs);
  // Ranks != 0: runs rank 0's mesh runs until it posts "done" (returns 0) or "abort" (throws Error
  // with rank 0's exit code).
  int serve(const Scenario& scenario);
  // Rank 0: no more mesh runs; waits (world barrier) until every rank has seen it.
  void finish();
  // Rank 0, best effort: tells the other ranks that it failed and with which exit code.
  void abort(const std::string& message, int exit_code) noexcept;

  // The session of this process (set by the constructor), or nullptr.
  static DistributedSession* current();

  struct Impl;

 private:
  std::unique_ptr<Impl> impl_;
};

// The mesh run of runChecks for backend "gloo": DistributedSession::current()->runLeader(inputs).
// Throws UsageError when this process is not rank 0 of a session.
MeshGradients runDistributedMesh(const MeshInputs& inputs);

// Runs this process as one rank: the session, then `leader` on rank 0 (runChecks and writing the
// outputs; returns the exit code) or the serve loop elsewhere, then the final barrier. Returns the
// exit code on success. On any failure it prints "moe-lbcheck: error: <message>" and ends the
// process at once with the error's exit code (_exit: no destructor may wait on a dead peer).
int runDistributedRank(const RankEnvironment& env, const Scenario& scenario,
                       const std::function<int()>& leader);

}  // namespace moe
