// The single-device float64 reference: finite differences of the *intended* objective (what the
// scenario or capture declares), with no autograd and no code shared with the simulation it judges
// (src/model, src/sim). It shares only the scenario structs and the data generator.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "data/problem.hpp"
#include "reference/objective.hpp"
#include "reference/reference_summary.hpp"
#include "scenario/scenario.hpp"

namespace moe {

// How the layer below the last carries a gate change through the last layer into the main loss
// (forward_cache.hpp, TokenSuffixBasis): on a per-token basis (BLAS, no H-length work per
// evaluation) or by the general per-evaluation propagation. Both are exact; kAuto picks the cheaper.
enum class SuffixBasis { kAuto, kAlways, kNever };

struct ReferenceOptions {
  double step = 1e-3;            // largest FD step, in logit units; shrunk per element below its margin
  double min_step = 1e-7;        // below this the element's routing is frozen (and counted)
  bool with_main = true;         // also differentiate the main loss (for the MAIN_GRAD control)
  int directional_checks = 2;    // random unit directions over all router weights (0 = none)
  std::uint64_t direction_seed = 0x5eed;
  SuffixBasis suffix_basis = SuffixBasis::kAuto;
  // The forward cache keeps the experts' [T, k, H] outputs up to this size, and recomputes rows from
  // their activations above it (same values; memory against time).
  double max_kept_expert_output_bytes = 256.0 * (1 << 20);
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

// The summary (method, steps, error estimate, values: reference_summary.hpp), then the gradients.
struct ReferenceResult : ReferenceSummary {
  std::vector<ReferenceLayer> layers;
  std::vector<DirectionalDerivative> directional;
  // Where `seconds` went: the cached forward pass, the per-layer logit gradients + chain rule (aux and,
  // with_main, main together: they share one suffix recompute per token), the directional checks.
  struct Phases {
    double forward_s = 0.0, gradients_s = 0.0, directional_s = 0.0;
  } phases;
};

// Every layer's d(J_aux + J_z)/dW_l (and dJ_main/dW_l) over the whole global batch:
//  * One forward pass caches, per layer, the logits z_l = h_l W_l (dgemm), their exponentials and row
//    sums, the routing, the gate weights and the expert activations.
//  * W_l enters J only through z_l and h_l does not depend on W_l, so dJ/dW_l = h_l^T dJ/dz_l exactly
//    (second dgemm). dJ/dz_l[t,e] is obtained by central finite differences of token t's own
//    contribution (the model has no attention, so a logit of token t changes only token t's path;
//    with the counts c_e and the routing held fixed J is a sum of such per-token terms), evaluated
//    as closed-form differences (layer_cache.hpp) so that only truncation error remains.
//  * Token t's later layers and main loss (its suffix) depend on z_l[t] only through its k gate
//    weights: their sensitivities d suffix / d g_s are central differences of the suffix recomputed
//    for that one token (routing frozen, later flips detected), k of them per token; each logit's
//    derivative is its own layer-l term plus sum_s psi_s dg_s/dz. Exact chain rule at the gates, and
//    E/k times cheaper than recomputing the suffix for every logit.
//  * Richardson: D(h) and D(h/2) give R = (4 D(h/2) - D(h)) / 3, the number reported; its error is
//    estimated from D(h/4) (richardson.hpp).
//  * Steps respect the top-k margins (scores are monotone in the logits for softmax and sigmoid);
//    below options.min_step the routing is frozen at the unperturbed choice and the element counted.
ReferenceResult computeReference(const ProblemData& data, const ObjectiveDefinition& objective,
                                 const ReferenceOptions& options = {});

// The objective's value by one full forward pass with routing recomputed (for closed-form tests).
struct ObjectiveValue {
  double aux = 0.0, z = 0.0, main = 0.0;
};
ObjectiveValue evaluateObjective(const ProblemData& data, const ObjectiveDefinition& objective);

}  // namespace moe
