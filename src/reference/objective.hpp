// The objective the reference differentiates: what a scenario (or a capture of a real job) intends,
// and how its tokens fall into the aux, z-loss and main-loss groups with their weights. Torch-free
// and independent of src/model and src/sim.
#pragma once

#include <cstdint>
#include <vector>

#include "data/problem.hpp"
#include "scenario/scenario.hpp"

namespace moe {

// The objective of one step:
//   J_aux = alpha * sum_G omega_G L_bal(G),  L_bal(G) = E/(k T_G) sum_e c_{G,e} P_{G,e}  (= 1 at perfect
//           balance; Megatron switch_load_balancing_loss_func, DeepSeek-V3 eqs. 17-20),
//   J_z   = beta * the z-loss groups' weighted means of logsumexp(z)^2 (ST-MoE eq. 5, Megatron
//           z_loss_func),
//   J_main = the main-loss scope's mean of 0.5 ||h_L - y||^2.
// omega_G is 1/#non-empty groups (uniform) or T_G / sum T (tokens). Counts c carry no gradient.
// The router terms (score, top_k, aux and z-loss) are RouterLossTerms' (scenario/scenario.hpp).
struct ObjectiveDefinition : RouterLossTerms {
  MainLossScope main_scope = MainLossScope::kMicrobatchMean;
  // dp and microbatches split the batch into the micro_batch groups: dp * microbatches consecutive
  // chunks of B / (dp * microbatches) sequences each (the other sizes are not read).
  MeshSizes mesh;
};

// The scenario's intended objective; the main scope and a kPreset weighting come from the preset's
// catalog record.
ObjectiveDefinition intendedObjective(const Scenario& scenario);

// Which group each token belongs to. Group indices are dense from 0; -1 = not in that token set.
struct GroupAssignment {
  std::vector<int> aux_group;   // [T] aux group (micro_batch: the (replica, microbatch) chunk, sequence:
                                //     the sequence, global_batch: 0), -1 outside the aux token set
  std::vector<int> z_group;     // [T] z-loss group, -1 outside the z-loss token set
  std::vector<int> main_group;  // [T] main-loss group, -1 for padding
  int aux_groups = 0, z_groups = 0, main_groups = 0;  // all groups, empty ones included
};

// Token sets and per-token weights of an objective.
struct TokenGroups {
  std::vector<int> aux_group;           // [T] aux group of token t; -1 outside the aux token set
  std::vector<std::int64_t> aux_size;   // [groups] T_G
  int aux_groups = 0;                   // all groups, empty ones included
  int aux_nonempty = 0;                 // groups with T_G > 0 (the mean of J_aux runs over these)
  std::int64_t empty_groups = 0;
  std::vector<double> aux_group_weight;  // [groups] omega_G
  std::vector<double> z_weight;          // [T] weight of lse_t^2 in J_z, beta included
  std::vector<double> main_weight;       // [T] weight of 0.5 ||h_L - y||^2 in J_main
};

// The groups of a scenario's objective over a whole global batch (validity from `valid`).
GroupAssignment assignGroups(const ProblemData& data, const ObjectiveDefinition& objective);

// Group sizes and weights: omega_G uniform over non-empty groups or by token share; z-loss weight
// beta / (T_group * #non-empty groups) for uniform micro_batch groups, beta / T for one group or
// token weighting (token-weighted group means collapse to one mean); main weight 1 / (T_group *
// #non-empty groups) for microbatch_mean, 1 / T for token_mean.
TokenGroups weighGroups(const GroupAssignment& assignment, const ObjectiveDefinition& objective);

}  // namespace moe
