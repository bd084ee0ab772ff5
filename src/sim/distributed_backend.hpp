// The distributed mesh backend: one process per rank (c10d Gloo, or NCCL for the rank program's
// collectives), where rank 0 alone runs the checks while every rank takes part in every mesh run.
//
// Rank 0 runs the leader (the checks and the report); each of its mesh runs goes through
// DistributedBackend::run, which posts the run's knobs as a command on the session's control channel
// and then runs the rank program like every other rank. The other ranks (serveMeshRuns) load the same
// problem, wait for each command, build the same request (checked against rank 0's by a fingerprint
// of the scenario and every input array), run the rank program and send their state (every router
// gradient they hold, and their router inputs when asked) to rank 0; they write nothing. The
// sequence of mesh runs is therefore whatever rank 0's checks need, never duplicated here. When rank 0
// is done it posts "done" and all ranks meet in a final barrier; when rank 0 fails it posts "abort"
// with its message and exit code, which the other ranks adopt.
//
// Liveness: a rank waiting for the next command fails (exit 3) when rank 0's store is gone or its
// heartbeat stops for the timeout; a rank blocked in a collective or recv fails when the peer's
// connection closes or the timeout (MOE_LBCHECK_TIMEOUT_S, default 60 s) passes.
#pragma once

#include <functional>

#include "sim/distributed_session.hpp"
#include "sim/mesh_backend.hpp"

namespace moe {

// Rank 0's side: one mesh run on every rank per call.
class DistributedBackend : public MeshBackend {
 public:
  explicit DistributedBackend(DistributedSession& session) : session_(session) {}
  std::string name() const override { return session_.backend(); }
  MeshRunResult run(const MeshRequest& request) override;

 private:
  DistributedSession& session_;
  bool posted_a_command_ = false;  // the test hooks of rank 0's first command (sim/test_hooks.hpp)
};

// Ranks != 0: runs rank 0's mesh runs until it posts "done" (returns 0) or "abort" (throws Error with
// rank 0's exit code).
int serveMeshRuns(DistributedSession& session, const Scenario& scenario);

// Runs this process as one rank: the session, then `leader` on rank 0 (the checks and writing the
// outputs; returns the exit code) or the serve loop elsewhere, then the final barrier. Returns the
// exit code on success. On any failure it prints "moe-lbcheck: error: <message>" and ends the process
// at once with the error's exit code (_exit: no destructor may wait on a dead peer).
int runDistributedRank(const RankEnvironment& env, const Scenario& scenario, const SessionOptions& options,
                       const std::function<int(MeshBackend&)>& leader);

}  // namespace moe
