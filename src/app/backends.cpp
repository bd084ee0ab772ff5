#include "app/backends.hpp"

#include <algorithm>

#include "common/errors.hpp"
#include "cuda/nccl_communicator.hpp"
#include "sim/c10d_communicator.hpp"
#include "sim/distributed_backend.hpp"
#include "sim/emulated_backend.hpp"
#include "sim/launcher.hpp"

namespace moe {

const std::vector<std::string>& backendNames() {
  static const std::vector<std::string> names = {"emulated", "gloo", "nccl"};
  return names;
}

int runWithMeshBackend(const BackendOptions& options, const Scenario& scenario,
                       const std::function<int(MeshBackend&)>& leader) {
  const std::string& name = options.name;
  if (std::find(backendNames().begin(), backendNames().end(), name) == backendNames().end())
    throw UsageError("unknown backend '" + name + "' (expected emulated, gloo or nccl)");
  if (name == "emulated") {
    if (options.nproc != 0) throw UsageError("--nproc applies to --backend gloo|nccl only");
    EmulatedBackend backend;
    return leader(backend);
  }
  SessionOptions session;
  session.backend = name;
  if (name == "nccl") {
    requireCudaDevice(-1);  // fails clearly (exit 3) without a usable GPU
    session.mesh_communicator = makeNcclCommunicator;
  }
  session.timeout = distributedTimeout();
  if (std::optional<RankEnvironment> env = detectRankEnvironment(options.nproc)) {
    checkRankEnvironment(*env, scenario, options.nproc);
    return runDistributedRank(*env, scenario, session, leader);
  }
  return launchLocalRanks(scenario, options.nproc != 0 ? options.nproc : static_cast<int>(scenario.mesh.world()), name,
                          [&](const RankEnvironment& env) { return runDistributedRank(env, scenario, session, leader); });
}

}  // namespace moe
