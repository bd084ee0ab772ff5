// The mesh-backend seam (c10d's Backend is the model): something with a name that runs one step of
// the scenario's mesh and returns what every rank ends with. Implementations: EmulatedBackend (every
// rank a thread of this process) and DistributedBackend (one process per rank over c10d Gloo, or
// NCCL, where this process is rank 0). Torch-free, so the CLI and the checks never see LibTorch.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "data/problem.hpp"
#include "scenario/scenario.hpp"
#include "sim/mesh_layout.hpp"

namespace moe {

// What one mesh run varies to isolate the aux gradient: Megatron's own aux-loss test zeroes the main
// loss by multiplying it by 0, which keeps every reduction and rescale of the pipeline in place.
struct RunKnobs {
  double main_loss_weight = 1.0;
  double aux_coeff = 0.0;     // alpha used for this run
  double z_loss_coeff = 0.0;  // beta used for this run
  // Each router sees its input detached (a capture's protocol): the gradient of W_l then holds the
  // layer's own aux and z-loss terms only.
  bool detach_router_inputs = false;
};

struct MeshRequest {
  const Scenario* scenario = nullptr;  // validated
  const ProblemData* data = nullptr;
  RunKnobs knobs;
  bool record_router_inputs = false;  // fill RankState::inputs (run --capture)
};

// What a router saw on one rank for one microbatch (the forward pass that was differentiated).
struct RouterInputRecord {
  int layer = 0;
  int microbatch = 0;
  std::vector<double> rows;             // [n, H] the router's input h_l, float64
  std::vector<std::int64_t> sequence;   // [n] sequence index in the global batch
  std::vector<std::int64_t> position;   // [n] position in the sequence
  std::vector<std::uint8_t> valid;      // [n] 1 = a real token
  std::vector<std::int64_t> topk;       // [n, k] the experts the rank routed each row to
};

// One rank after the step: the router-weight gradient of every layer it holds, after every
// reduction and rescale of the convention ([H*E] float64), and optionally its router inputs.
struct RankState {
  int rank = 0;
  RankCoords coords;
  std::map<int, std::vector<double>> router_grad;
  std::vector<RouterInputRecord> inputs;
};

struct MeshRunResult {
  std::vector<RankState> ranks;  // index = rank
  double seconds = 0.0;
  // The gradient of `layer` on the lowest rank that holds it.
  const std::vector<double>& gradientOf(int layer) const;
  // gradientOf for layers 0..layers-1.
  std::vector<std::vector<double>> layerGradients(int layers) const;
};

class MeshBackend {
 public:
  virtual ~MeshBackend() = default;
  // "emulated", "gloo", "nccl": used in every message about the backend.
  virtual std::string name() const = 0;
  // One optimizer step of the request's mesh on every rank. Throws RuntimeFailure (naming the
  // backend, rank and operation) when a rank fails; no rank is left waiting.
  virtual MeshRunResult run(const MeshRequest& request) = 0;
};

}  // namespace moe
