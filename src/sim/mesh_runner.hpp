// Runs every rank of an emulated mesh (one thread per rank, one process) and gathers the reduced
// router-weight gradients, one copy per layer, from the DP/CP rank 0 of the stage that owns it.
#pragma once

#include <vector>

#include "sim/emulated_communicator.hpp"
#include "sim/rank_program.hpp"

namespace moe {

struct MeshGradients {
  std::vector<std::vector<double>> router_grad;  // per layer [H*E], float64
  double seconds = 0.0;
};

// Throws RuntimeFailure if any rank fails (the others are aborted, never left waiting).
MeshGradients runEmulatedMesh(const MeshInputs& inputs, const EmulatedOptions& options = {});

}  // namespace moe
