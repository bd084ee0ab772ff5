// The one path from evidence to a report's checks: every check `run` and `verify` make, each built
// here with its diagnosis, from plain vectors (no torch, no mesh, no reference internals). The callers
// (src/app/check_run.cpp, src/app/verify.cpp) gather the evidence; this file decides.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "check/diagnosis.hpp"
#include "report/report.hpp"

namespace moe {

// aux_grad/layer{l}/router_weight: the mesh's (job's) aux gradient against the reference's
// d(J_aux + J_z)/dW_l, diagnosed when it fails. atol: the reference's FD error bound, times 10.
CheckResult checkAuxGradient(int layer, const std::vector<double>& mesh, const std::vector<double>& reference,
                             double rtol, double atol, const MeshQuantities& quantities,
                             const std::string& scale_knob, const std::string& method);

// main_grad/layer{l}/router_weight: the main-loss control (aux coefficient 0), MAIN_GRAD_MISMATCH.
CheckResult checkMainGradient(int layer, const std::vector<double>& mesh, const std::vector<double>& reference,
                              double rtol, double atol, const std::string& method);

// aux_grad/coeff_linearity: the mesh at 2 alpha against 2 x the mesh at alpha (catches a coefficient
// used as a gate, NeMo Automodel #1408 item 2), AUX_COEFF_NONLINEAR.
CheckResult checkCoeffLinearity(const std::vector<double>& at_alpha, const std::vector<double>& at_two_alpha,
                                double rtol);

// aux_grad/directional/{i} (informational): <g, V> against a directional finite difference.
CheckResult checkDirectional(int index, double mesh_derivative, double reference_derivative, double fd_error,
                             double rtol);

// objective/layout_invariance (informational, OBJECTIVE_NOT_INVARIANT): a micro_batch-scoped objective
// depends on dp and M by definition. nullopt when the two values agree to 1e-12.
std::optional<CheckResult> findObjectiveNotInvariant(double value_on_mesh, double value_as_one_group);

// objective/group_weighting (informational, OBJECTIVE_WEIGHTING): the preset weighs the aux groups by
// their tokens while the groups hold different numbers of tokens; scale and cosine are those of the
// mesh gradient against the uniform-weighted reference, so that the difference to DeepSeek-V3's
// uniform mean is visible without asking for it.
CheckResult findObjectiveWeighting(const std::vector<double>& mesh, const std::vector<double>& uniform_reference,
                                   double rtol, const std::string& preset);

// reference/routing_margins (informational, FD_UNRELIABLE) when some logits were frozen.
std::optional<CheckResult> findRoutingMargins(std::int64_t frozen_elements);

// One rank's copy of a router gradient.
struct ReplicaGradient {
  int rank = 0;
  const std::vector<double>* grad = nullptr;
};

// replicas/layer{l}: every rank that holds the router replica ends with the same gradient (within
// rtol of the largest element of the lowest rank's copy); REPLICA_DIVERGENCE naming the ranks that
// differ from the lowest one. `replicas` sorted by rank, at least one.
CheckResult checkReplicas(int layer, const std::vector<ReplicaGradient>& replicas, double rtol);

// routing/layer{l} (informational, ROUTING_DIFFERS when > 0): rows whose recorded top-k differs from
// the top-k of the recorded scores.
CheckResult findRoutingDifferences(int layer, std::int64_t rows_differing, std::int64_t rows);

// Does the outcome match the expectation? A factor matches the attributed factor or any of its
// alternatives. Explains why not in `detail`.
bool expectationMet(const Expectation& expect, Verdict verdict, const std::vector<CheckResult>& checks,
                    std::string& detail);

}  // namespace moe
