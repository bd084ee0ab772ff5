// The single-device float64 reference of DESIGN §4: finite differences of the *intended* objective
// (what the scenario declares), with no autograd and no code shared with the simulation it judges
// (src/model, src/sim). It shares only the scenario structs and the data generator.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "data/problem.hpp"
#include "scenario/scenario.hpp"

namespace moe {

// The objective a scenario intends (DESIGN §3). Token groups of the micro_batch scopes are the
// (DP replica, microbatch) chunks: dp * microbatches consecutive chunks of B / (dp * microbatches)
// sequences each.
struct ObjectiveDefinition {
  ScoreFunction score = ScoreFunction::kSoftmax;
  int top_k = 2;
  bool norm_topk_prob = false;
  AuxScope aux_scope = AuxScope::kMicroBatch;
  double aux_coeff = 0.0;       // alpha
  double z_coeff = 0.0;         // beta
  ZLossScope z_scope = ZLossScope::kMicroBatch;
  bool exclude_padding = true;  // aux and z-loss token sets: valid tokens only (true) or all tokens
  // How groups are averaged (resolved: never kPreset). kUniform: alpha * mean over non-empty groups;
  // kTokens: alpha * sum_G (T_G / sum T) L_G. Applies to the micro_batch z-loss groups too.
  GroupWeighting group_weighting = GroupWeighting::kUniform;
  MainLossScope main_scope = MainLossScope::kMicrobatchMean;
  int dp = 1;
  int microbatches = 1;
};

// The scenario's intended objective; main_scope comes from the preset catalog.
ObjectiveDefinition intendedObjective(const Scenario& scenario);

struct ReferenceOptions {
  double step = 1e-3;            // largest FD step, in logit units; shrunk per element below its margin
  double min_step = 1e-7;        // below this the element's routing is frozen (and counted)
  bool with_main = true;         // also differentiate the main loss (for the MAIN_GRAD control)
  int directional_checks = 2;    // random unit directions over all router weights (0 = none)
  std::uint64_t direction_seed = 0x5eed;
};

struct ReferenceLayer {
  std::vector<double> aux_grad;   // [H, E] d(J_aux + J_z)/dW_l
  std::vector<double> main_grad;  // [H, E] dJ_main/dW_l (empty unless with_main)
  double aux_value = 0.0;         // this layer's J_aux term (alpha included)
  double z_value = 0.0;           // this layer's J_z term (beta included)
  double aux_fd_error = 0.0;      // Richardson estimate, max abs over the elements of aux_grad
  double main_fd_error = 0.0;
};

// dJ_aux+z along a random unit direction V over all router weights, by central differences of a
// full forward recompute (routing frozen), Richardson-extrapolated. The caller compares <g, V>.
struct DirectionalDerivative {
  std::vector<std::vector<double>> direction;  // per layer [H, E]; unit norm over all layers
  double derivative = 0.0;
  double fd_error = 0.0;
};

struct ReferenceResult {
  std::vector<ReferenceLayer> layers;
  double aux_value = 0.0, z_value = 0.0, main_value = 0.0;  // summed over layers
  std::int64_t empty_groups = 0;    // aux groups with no token in their token set (per layer count / layers)
  std::int64_t near_ties = 0;       // elements whose step was shrunk below `step` by a top-k margin
  std::int64_t frozen_elements = 0; // elements evaluated with routing frozen (margin < min_step, or a
                                    // later layer's routing would have flipped)
  double max_step = 0.0;
  double fd_error_estimate = 0.0;   // max over layers of aux_fd_error
  std::string method;               // human-readable description of how the numbers were produced
  std::vector<DirectionalDerivative> directional;
  double seconds = 0.0;
};

ReferenceResult computeReference(const ProblemData& data, const ObjectiveDefinition& objective,
                                 const ReferenceOptions& options = {});

// The objective's value by one full forward pass with routing recomputed (for closed-form tests).
struct ObjectiveValue {
  double aux = 0.0, z = 0.0, main = 0.0;
};
ObjectiveValue evaluateObjective(const ProblemData& data, const ObjectiveDefinition& objective);

}  // namespace moe
