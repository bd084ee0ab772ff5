// A framework convention: how a preset normalizes the main loss, reduces gradients over DP, rescales
// after the pipeline, and injects and scales the aux-loss gradient, read from the preset's catalog
// record; plus the named faults that break one of those steps. Each rule cites its source in
// convention.cpp.
#pragma once

#include <set>

#include "scenario/catalog.hpp"
#include "scenario/scenario.hpp"

namespace moe {

// The numbers a rank needs to scale one microbatch (all token counts already all-reduced).
struct ScaleInputs {
  MeshSizes mesh;
  int micro_batch_size = 1;
  double microbatch_valid_tokens = 0;  // loss tokens of this (replica, microbatch), all its shards
  double group_aux_tokens = 0;         // aux tokens of the aux group being injected (all its shards)
  double local_aux_tokens = 0;         // this rank's share of them (its CP/SP shard)
  double global_valid_tokens = 0;      // loss tokens of the whole global batch
  bool exclude_padding = true;         // a padding mask is passed (the token counts are of valid tokens)
};

struct Convention {
  const PresetRecord* preset = nullptr;
  std::set<Fault> faults;

  bool has(Fault fault) const { return faults.count(fault) != 0; }
  Injection injection() const { return preset->injection; }
  GradReduction gradReduction() const { return preset->grad_reduction; }

  // Multiplier of this rank's sum of per-token main losses for one microbatch.
  double mainLossMultiplier(const ScaleInputs& in) const;
  // MoEAuxLossAutoScaler backward scale (autoscaler presets; 1 otherwise).
  double auxBackwardScale(const ScaleInputs& in) const;
  // Multiplier of alpha * (this rank's partial aux loss of `scope`) before it is injected or added.
  double auxValueMultiplier(const ScaleInputs& in, AuxScope scope) const;
  // The same for beta * (this rank's partial z-loss of `scope`).
  double zLossMultiplier(const ScaleInputs& in, AuxScope scope) const;
  // Factor applied to every gradient after the DP reduction (PP post-hoc scaling, per-token division).
  double postReductionScale(const ScaleInputs& in) const;
};

// The preset's convention with the scenario's faults (validated: every fault applies).
Convention conventionFor(const Scenario& scenario);

}  // namespace moe
