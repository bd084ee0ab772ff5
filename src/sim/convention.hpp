// A framework convention (DESIGN §5): how a preset normalizes the main loss, reduces gradients over
// DP, rescales after the pipeline, and injects and scales the aux-loss gradient; plus the named
// faults that break one of those steps. Each rule cites its source in convention.cpp.
#pragma once

#include <set>
#include <string>

#include "scenario/scenario.hpp"

namespace moe {

enum class Injection {
  kAutoScaler,        // Megatron/Automodel MoEAuxLossAutoScaler on the gate weights, backward scale
  kIdentityFunction,  // torchtitan _AuxLossInjection: identity forward, scale applied to the value
  kLossAdd,           // DeepSpeed / HF: aux added to the loss that backward starts from
};
enum class GradReduction { kMean, kSum };  // over the dp x cp group (DDP/FSDP)

// The numbers a rank needs to scale one microbatch (all token counts already all-reduced).
struct ScaleInputs {
  int dp = 1, cp = 1, pp = 1, microbatches = 1, micro_batch_size = 1;
  double microbatch_valid_tokens = 0;  // loss tokens of this (replica, microbatch), all CP shards
  double group_aux_tokens = 0;         // aux tokens of the aux group being injected
  double global_valid_tokens = 0;      // loss tokens of the whole global batch
};

struct Convention {
  std::string preset;
  Injection injection = Injection::kAutoScaler;
  GradReduction grad_reduction = GradReduction::kMean;
  std::set<std::string> faults;

  bool has(const std::string& fault) const { return faults.count(fault) != 0; }

  // Multiplier of this rank's sum of per-token main losses for one microbatch.
  double mainLossMultiplier(const ScaleInputs& in) const;
  // MoEAuxLossAutoScaler backward scale (kAutoScaler only; 1 otherwise).
  double auxBackwardScale(const ScaleInputs& in, AuxScope scope) const;
  // Multiplier of alpha * (this rank's partial aux loss) before it is injected or added.
  double auxValueMultiplier(const ScaleInputs& in, AuxScope scope) const;
  // True when the convention scales every microbatch's loss by 1 / M (Megatron, Automodel,
  // DeepSpeed, HF); false where the step is normalized by a global token count instead.
  bool dividesByMicrobatches() const {
    return preset != "megatron_per_token" && preset != "torchtitan";
  }
  // Factor applied to every gradient after the DP reduction (PP post-hoc scaling, per-token division).
  double postReductionScale(const ScaleInputs& in) const;
};

// The preset's convention with the scenario's faults applied. Throws InputError for a preset/mesh
// combination the framework does not support.
Convention conventionFor(const Scenario& scenario);

}  // namespace moe
