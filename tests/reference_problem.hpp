// The two halves of a reference test problem, shared by the table-driven reference tests (torch-free
// golden numbers, and the comparison with an autograd implementation): the scenario that sizes the
// generated data, and the objective the reference differentiates.
#pragma once

#include <cstdint>
#include <vector>

#include "reference/objective.hpp"
#include "scenario/scenario.hpp"

namespace moe::test {

// Sizes: batch B, seq_len S, hidden H, experts E, ffn F, layers L; valid_lengths empty = no padding.
inline Scenario problemScenario(std::uint64_t seed, int B, int S, int H, int E, int F, int L,
                                std::vector<int> valid_lengths) {
  Scenario sc;
  sc.seed = seed;
  sc.model.hidden = H;
  sc.model.experts = E;
  sc.model.ffn = F;
  sc.model.layers = L;
  sc.data.batch = B;
  sc.data.seq_len = S;
  sc.data.valid_lengths = std::move(valid_lengths);
  return sc;
}

// The router terms (in RouterLossTerms' order: score, top_k, norm_topk_prob, aux_scope, alpha, beta,
// z_scope, exclude_padding, group_weighting), then the main-loss scope and the mesh sizes that split
// the batch into micro_batch groups.
struct ObjectiveSpec : RouterLossTerms {
  MainLossScope main_scope;
  int dp, microbatches;
};

inline ObjectiveDefinition problemObjective(const ObjectiveSpec& s) {
  ObjectiveDefinition o;
  static_cast<RouterLossTerms&>(o) = s;
  o.main_scope = s.main_scope;
  o.mesh.dp = s.dp;
  o.mesh.microbatches = s.microbatches;
  return o;
}

}  // namespace moe::test
