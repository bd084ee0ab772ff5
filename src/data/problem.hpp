// The numbers a check runs on: inputs, targets, padding mask and weights, in float64, laid out
// row-major. Generated deterministically from the scenario seed (or read from a safetensors file).
// Shared by the simulation and the reference (the data generator is the one thing the two may share); neither
// may modify it.
#pragma once

#include <cstdint>
#include <vector>

#include "scenario/scenario.hpp"

namespace moe {

struct ProblemData {
  int batch = 0, seq_len = 0, hidden = 0, experts = 0, ffn = 0, layers = 0;
  std::vector<double> x;       // [B, S, H] input hidden states of layer 0
  std::vector<double> y;       // [B, S, H] targets of the main loss
  std::vector<std::uint8_t> valid;  // [B, S] 1 = real token, 0 = padding
  std::vector<std::vector<double>> router_weight;  // per layer [H, E]
  std::vector<std::vector<double>> expert_in;      // per layer [E, H, F]
  std::vector<std::vector<double>> expert_out;     // per layer [E, F, H]

  std::int64_t tokens() const { return static_cast<std::int64_t>(batch) * seq_len; }
};

// Deterministic in scenario.seed and the model/data sizes, identical on every platform (own
// splitmix64 + Box-Muller; no library RNG). x, y ~ N(0,1); router weights ~ N(0, 1/H) so logits are
// ~N(0,1); expert_in ~ N(0, 1/H); expert_out ~ N(0, 1/F). valid[b][s] = s < valid_lengths[b].
ProblemData generateProblem(const Scenario& scenario);

// A ProblemData with the scenario's sizes (batch, seq_len, hidden, experts, ffn, layers) and no tensors.
ProblemData problemShapeOf(const Scenario& scenario);

// generateProblem, or the safetensors file named by scenario.data.safetensors when set.
ProblemData loadProblem(const Scenario& scenario);

}  // namespace moe
