// One rank's membership in a real (one process per rank) mesh: the rendezvous store, the check that
// every rank runs the same scenario with a distinct RANK, the process groups, and the control channel
// rank 0 drives the others with.
#pragma once

#include <chrono>
#include <functional>
#include <memory>
#include <string>

#include "sim/c10d_communicator.hpp"
#include "sim/control_channel.hpp"
#include "sim/launcher.hpp"
#include "sim/mesh_layout.hpp"

namespace moe {

// Creates the communicator the rank program's collectives run on, collectively over every rank of
// `layout`, bootstrapped through the session's store (the NCCL one lives in src/cuda).
using MeshCommunicatorFactory = std::function<std::unique_ptr<Communicator>(
    c10d::Store& store, const std::string& prefix, int rank, int local_rank, const MeshLayout& layout)>;

struct SessionOptions {
  std::string backend = "gloo";  // the backend's name: named in every message
  std::chrono::milliseconds timeout{60000};
  // Empty: the rank program's collectives run on the session's Gloo communicator.
  MeshCommunicatorFactory mesh_communicator;
};

class DistributedSession {
 public:
  // Collective over all ranks: connects to (rank 0: serves, unless the launcher hosts it) the
  // TCPStore at MASTER_ADDR:MASTER_PORT, checks that every rank runs the same scenario with a
  // distinct RANK, and creates the process groups. Throws UsageError for a port in use or a
  // mismatched rank, RuntimeFailure for a rendezvous that fails or times out.
  DistributedSession(const RankEnvironment& env, const Scenario& scenario, const SessionOptions& options);
  ~DistributedSession();
  DistributedSession(const DistributedSession&) = delete;
  DistributedSession& operator=(const DistributedSession&) = delete;

  int rank() const;
  int worldSize() const;
  const std::string& backend() const;
  std::chrono::milliseconds timeout() const;
  const MeshLayout& layout() const;
  // The Gloo communicator of the session's own traffic: gathering results, barriers.
  C10dCommunicator& control();
  // The communicator of the rank program's collectives (Gloo, or the backend's own).
  Communicator& mesh();
  ControlChannel& channel();

  struct Impl;

 private:
  std::unique_ptr<Impl> impl_;
};

}  // namespace moe
