// What one rank of a tp x cp x dp x pp mesh does for one optimizer step: its microbatches through its
// pipeline chunks in schedule order, the aux statistics all-reduced over CP (and DP for global scope),
// the aux gradient injected per the convention, gradients accumulated, reduced over dp x cp and
// rescaled. The same program runs on every backend; only the Communicator differs.
#pragma once

#include <vector>

#include <torch/torch.h>

#include "data/problem.hpp"
#include "model/moe_layer.hpp"
#include "sim/communicator.hpp"
#include "sim/convention.hpp"
#include "sim/mesh_backend.hpp"
#include "sim/mesh_layout.hpp"

namespace moe {

// Read-only inputs shared by all ranks of one run (tensors in the run's dtype).
struct MeshInputs {
  Scenario scenario;
  MeshLayout layout;
  Convention convention;
  RunKnobs knobs;
  bool record_router_inputs = false;
  at::Tensor x, y;      // [B*S, H]
  at::Tensor valid;     // [B*S] bool
  std::vector<LayerWeights> layers;  // router_weight without grad; each rank clones its own
};

MeshInputs makeMeshInputs(const MeshRequest& request);

// The rank's state after the step: the reduced router-weight gradients of the layers it owns (float64
// [H*E]) and, when asked, its router inputs.
RankState runRank(const MeshInputs& inputs, Communicator& comm);

}  // namespace moe
