// What one rank of a dp x pp x cp mesh does for one optimizer step: its microbatches through its
// pipeline chunks in schedule order, the aux statistics all-reduced over CP (and DP for global
// scope), the aux gradient injected per the convention, gradients accumulated, reduced over dp x cp
// and rescaled. The same program runs on every backend; only the Communicator differs.
#pragma once

#include <map>
#include <vector>

#include <torch/torch.h>

#include "data/problem.hpp"
#include "model/moe_layer.hpp"
#include "sim/communicator.hpp"
#include "sim/convention.hpp"
#include "sim/mesh_layout.hpp"

namespace moe {

// What a run varies to isolate the aux gradient (DESIGN §4): Megatron's test zeroes the main loss
// by multiplying it by 0, which keeps every reduction and rescale of the pipeline in place.
struct RunKnobs {
  double main_loss_weight = 1.0;
  double aux_coeff = 0.0;     // alpha used for this run
  double z_loss_coeff = 0.0;  // beta used for this run
};

// Read-only inputs shared by all ranks of one run (tensors in the run's dtype).
struct MeshInputs {
  Scenario scenario;
  MeshLayout layout;
  Convention convention;
  RunKnobs knobs;
  at::Tensor x, y;      // [B*S, H]
  at::Tensor valid;     // [B*S] bool
  std::vector<LayerWeights> layers;  // router_weight without grad; each rank clones its own
};

MeshInputs makeMeshInputs(const Scenario& scenario, const ProblemData& data, const RunKnobs& knobs);

// A rank's result: the reduced router-weight gradients of the layers it owns, in float64 [H*E].
struct RankResult {
  std::map<int, std::vector<double>> router_grad;
};

RankResult runRank(const MeshInputs& inputs, Communicator& comm);

}  // namespace moe
