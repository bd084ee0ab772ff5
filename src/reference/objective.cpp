#include "reference/objective.hpp"

#include <string>

#include "common/errors.hpp"
#include "scenario/catalog.hpp"

namespace moe {

ObjectiveDefinition intendedObjective(const Scenario& scenario) {
  const PresetRecord& preset = presetRecord(scenario.framework.preset);
  ObjectiveDefinition objective;
  objective.score = scenario.model.score;
  objective.top_k = scenario.model.top_k;
  objective.norm_topk_prob = scenario.model.norm_topk_prob;
  objective.aux_scope = scenario.aux.type;
  objective.aux_coeff = scenario.aux.coeff;
  objective.z_coeff = scenario.aux.z_loss_coeff;
  objective.z_scope = scenario.aux.z_loss_scope;
  objective.exclude_padding = scenario.aux.exclude_padding;
  objective.mesh = scenario.mesh;
  objective.main_scope = preset.main_loss_scope;
  objective.group_weighting = scenario.aux.group_weighting == GroupWeighting::kPreset
                                  ? preset.group_weighting
                                  : scenario.aux.group_weighting;
  return objective;
}

GroupAssignment assignGroups(const ProblemData& data, const ObjectiveDefinition& objective) {
  using Index = std::int64_t;
  const int B = data.batch, S = data.seq_len;
  const Index T = data.tokens();
  const int chunks = objective.mesh.dp * objective.mesh.microbatches;
  const bool needs_chunks = objective.aux_scope == AuxScope::kMicroBatch ||
                            objective.z_scope == ZLossScope::kMicroBatch ||
                            objective.main_scope == MainLossScope::kMicrobatchMean;
  if (needs_chunks && (chunks <= 0 || B % chunks != 0)) {
    throw InputError("", "/mesh",
                     "a batch divisible by dp*microbatches for the micro_batch token groups (batch " +
                         std::to_string(B) + ", dp*microbatches " + std::to_string(chunks) + ")");
  }
  const int sequences_per_chunk = chunks > 0 && B % chunks == 0 ? B / chunks : B;
  const int n_chunks = B / sequences_per_chunk;
  // micro_batch groups: dp*M consecutive chunks of B/(dp*M) sequences (DP replica r holds sequences
  // [r B/dp, (r+1) B/dp), its microbatch m the m-th consecutive chunk); sequence groups: one per
  // sequence (DeepSeek-V3 eqs. 17-20); global_batch: one group (arXiv 2501.11873).
  auto chunkOf = [&](Index t) { return static_cast<int>((t / S) / sequences_per_chunk); };
  auto inAuxSet = [&](Index t) { return !objective.exclude_padding || data.valid[t] != 0; };

  GroupAssignment a;
  switch (objective.aux_scope) {
    case AuxScope::kMicroBatch: a.aux_groups = n_chunks; break;
    case AuxScope::kSequence: a.aux_groups = B; break;
    case AuxScope::kGlobalBatch: a.aux_groups = 1; break;
  }
  a.z_groups = objective.z_scope == ZLossScope::kMicroBatch ? n_chunks : 1;
  a.main_groups = n_chunks;
  a.aux_group.assign(T, -1);
  a.z_group.assign(T, -1);
  a.main_group.assign(T, -1);
  for (Index t = 0; t < T; ++t) {
    if (data.valid[t] != 0) a.main_group[t] = chunkOf(t);
    if (!inAuxSet(t)) continue;
    switch (objective.aux_scope) {
      case AuxScope::kMicroBatch: a.aux_group[t] = chunkOf(t); break;
      case AuxScope::kSequence: a.aux_group[t] = static_cast<int>(t / S); break;
      case AuxScope::kGlobalBatch: a.aux_group[t] = 0; break;
    }
    a.z_group[t] = objective.z_scope == ZLossScope::kMicroBatch ? chunkOf(t) : 0;
  }
  return a;
}

namespace {

// Tokens per group and the number of groups that hold any.
struct GroupCounts {
  std::vector<std::int64_t> size;
  std::int64_t total = 0;
  int nonempty = 0;
};

GroupCounts countGroups(const std::vector<int>& group_of, int groups) {
  GroupCounts c;
  c.size.assign(groups, 0);
  for (int g : group_of)
    if (g >= 0) ++c.size[g], ++c.total;
  for (std::int64_t n : c.size) c.nonempty += n > 0 ? 1 : 0;
  return c;
}

}  // namespace

TokenGroups weighGroups(const GroupAssignment& a, const ObjectiveDefinition& objective) {
  const std::size_t T = a.aux_group.size();
  TokenGroups groups;
  groups.aux_group = a.aux_group;
  groups.aux_groups = a.aux_groups;
  const GroupCounts aux = countGroups(a.aux_group, a.aux_groups);
  groups.aux_size = aux.size;
  groups.aux_nonempty = aux.nonempty;
  groups.empty_groups = a.aux_groups - aux.nonempty;
  // Group weights: uniform (alpha * mean over groups) or token-weighted (Megatron per-token mode,
  // torchtitan: raw_sum * coeff / global_valid_tokens).
  groups.aux_group_weight.assign(a.aux_groups, 0.0);
  for (int g = 0; g < a.aux_groups; ++g) {
    if (aux.size[g] == 0) continue;
    groups.aux_group_weight[g] = objective.group_weighting == GroupWeighting::kTokens
                                     ? double(aux.size[g]) / double(aux.total)
                                     : 1.0 / aux.nonempty;
  }

  // z-loss: beta * mean over the z groups (with tokens) of the group's mean of lse^2 (Megatron
  // z_loss_func per microbatch); token-weighted group means collapse to one mean over all tokens.
  const GroupCounts z = countGroups(a.z_group, a.z_groups);
  groups.z_weight.assign(T, 0.0);
  const bool per_group = objective.group_weighting != GroupWeighting::kTokens;
  for (std::size_t t = 0; t < T; ++t) {
    const int g = a.z_group[t];
    if (g < 0) continue;
    groups.z_weight[t] = per_group ? objective.z_coeff / (double(z.size[g]) * z.nonempty)
                                   : objective.z_coeff / double(z.total);
  }

  // Main loss, valid tokens only. token_mean: 1/|V|; microbatch_mean: mean over groups with >= 1
  // valid token of the group's valid-token mean.
  const GroupCounts main = countGroups(a.main_group, a.main_groups);
  groups.main_weight.assign(T, 0.0);
  for (std::size_t t = 0; t < T; ++t) {
    const int g = a.main_group[t];
    if (g < 0) continue;
    groups.main_weight[t] = objective.main_scope == MainLossScope::kMicrobatchMean
                                ? 1.0 / (double(main.size[g]) * main.nonempty)
                                : 1.0 / double(main.total);
  }
  return groups;
}

}  // namespace moe
