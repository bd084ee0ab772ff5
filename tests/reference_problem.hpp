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

struct ObjectiveSpec {
  ScoreFunction score;
  int top_k;
  bool norm_topk_prob;
  AuxScope aux_scope;
  double alpha, beta;
  ZLossScope z_scope;
  bool exclude_padding;
  GroupWeighting weighting;
  MainLossScope main_scope;
  int dp, microbatches;
};

inline ObjectiveDefinition problemObjective(const ObjectiveSpec& s) {
  ObjectiveDefinition o;
  o.score = s.score;
  o.top_k = s.top_k;
  o.norm_topk_prob = s.norm_topk_prob;
  o.aux_scope = s.aux_scope;
  o.aux_coeff = s.alpha;
  o.z_coeff = s.beta;
  o.z_scope = s.z_scope;
  o.exclude_padding = s.exclude_padding;
  o.group_weighting = s.weighting;
  o.main_scope = s.main_scope;
  o.mesh.dp = s.dp;
  o.mesh.microbatches = s.microbatches;
  return o;
}

}  // namespace moe::test
