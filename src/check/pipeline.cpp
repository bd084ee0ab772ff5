#include "check/pipeline.hpp"

#include <algorithm>
#include <cmath>

#include <fmt/format.h>

#include "check/compare.hpp"

namespace moe {
namespace {

std::vector<double> scaled(const std::vector<double>& v, double s) {
  std::vector<double> out(v);
  for (double& e : out) e *= s;
  return out;
}

CheckResult finding(const std::string& name, CheckKind kind, const std::string& method) {
  CheckResult c;
  c.name = name;
  c.kind = kind;
  c.informational = true;
  c.method = method;
  return c;
}

// A diagnosis that names no factor (every one but the scaled aux gradient's).
Diagnosis diagnosisOf(DiagnosisCode code, double value, std::string cause, std::string fix) {
  Diagnosis d;
  d.code = code;
  d.value = value;
  d.cause = std::move(cause);
  d.fix = std::move(fix);
  return d;
}

}  // namespace

CheckResult checkAuxGradient(int layer, const std::vector<double>& mesh, const std::vector<double>& reference,
                             double rtol, double atol, const MeshQuantities& quantities, const std::string& knob,
                             const std::string& method) {
  CheckResult c = compareVectors(fmt::format("aux_grad/layer{}/router_weight", layer), mesh, reference, rtol, atol);
  c.kind = CheckKind::kAuxGrad;
  c.layer = layer;
  c.method = method;
  if (!c.ok) diagnoseAuxGradient(c, quantities, knob, norm2(mesh), norm2(reference));
  return c;
}

CheckResult checkMainGradient(int layer, const std::vector<double>& mesh, const std::vector<double>& reference,
                              double rtol, double atol, const std::string& method) {
  CheckResult c = compareVectors(fmt::format("main_grad/layer{}/router_weight", layer), mesh, reference, rtol, atol);
  c.kind = CheckKind::kMainGrad;
  c.layer = layer;
  c.method = method;
  if (!c.ok) {
    c.diagnosis = diagnosisOf(
        DiagnosisCode::kMainGradMismatch, c.scale,
        fmt::format("the main-loss gradient (aux coefficient 0) differs from the reference (scale {:.9g}, cosine "
                    "{:.9f}): the control shows the mesh itself, not only its aux path, is off",
                    c.scale, c.cosine),
        "check the main-loss normalization and the gradient reduction of the preset");
  }
  return c;
}

CheckResult checkCoeffLinearity(const std::vector<double>& g1, const std::vector<double>& g2, double rtol) {
  CheckResult c = compareVectors("aux_grad/coeff_linearity", g2, scaled(g1, 2.0), rtol, 0.0);
  c.kind = CheckKind::kCoeffLinearity;
  c.method = "mesh at 2 alpha against 2 x mesh at alpha";
  if (!c.ok) {
    c.diagnosis = diagnosisOf(
        DiagnosisCode::kAuxCoeffNonlinear, 2.0 * c.scale,
        fmt::format("doubling the aux coefficient multiplies the aux gradient by {:.9g}, not 2: the coefficient is "
                    "not multiplied into the injected loss (NeMo Automodel #1408: used only as a > 0 gate)",
                    2.0 * c.scale),
        "multiply the aux loss by its coefficient before injecting it");
  }
  return c;
}

CheckResult checkDirectional(int index, double mesh_derivative, double reference_derivative, double fd_error,
                             double rtol) {
  CheckResult d = compareVectors(fmt::format("aux_grad/directional/{}", index), {mesh_derivative},
                                 {reference_derivative}, rtol, 10 * fd_error);
  d.kind = CheckKind::kDirectional;
  d.method = "central differences of a full forward recompute (routing frozen) along a random rank-one unit direction";
  d.informational = true;  // the element-wise checks decide; this one corroborates
  return d;
}

std::optional<CheckResult> findObjectiveNotInvariant(double a, double b) {
  const double rel = std::fabs(a - b) / std::max(std::fabs(b), 1e-300);
  if (!(rel > 1e-12)) return std::nullopt;
  CheckResult c = finding("objective/layout_invariance", CheckKind::kObjectiveInvariance,
                          "reference objective at this mesh against one group of the whole batch");
  c.diagnosis = diagnosisOf(
      DiagnosisCode::kObjectiveNotInvariant, rel,
      fmt::format("the micro_batch aux objective is defined per (DP replica, microbatch) group, so it changes with dp "
                  "and M by definition: J = {:.12g} on this mesh, {:.12g} as one group (relative difference {:.3g}). "
                  "Not a scaling bug: a property of the objective",
                  a, b, rel),
      "use aux.type global_batch (Qwen, arXiv 2501.11873) or sequence when the balancing must "
      "not depend on the parallel layout");
  return c;
}

CheckResult findObjectiveWeighting(const std::vector<double>& mesh, const std::vector<double>& uniform_reference,
                                   double rtol, const std::string& preset) {
  CheckResult c = compareVectors("objective/group_weighting", mesh, uniform_reference, rtol, 0.0);
  c.kind = CheckKind::kObjectiveWeighting;
  c.informational = true;
  c.ok = true;  // a property of the objective, not a failure
  c.method = "mesh aux gradient against the reference with aux groups weighted uniformly";
  c.diagnosis = diagnosisOf(
      DiagnosisCode::kObjectiveWeighting, c.cosine,
      fmt::format("preset {} weighs each aux group by its share of the tokens (sum_G T_G L_G / sum T), and the groups "
                  "here hold different numbers of tokens: against DeepSeek-V3's uniform mean over groups the gradient "
                  "has scale {:.9g} and cosine {:.10f}. Not a bug of the mesh: the objective the framework computes",
                  preset, c.scale, c.cosine),
      "set aux.group_weighting to \"tokens\" to check this objective explicitly, or to "
      "\"uniform\" to check the framework against the uniform mean");
  return c;
}

std::optional<CheckResult> findRoutingMargins(std::int64_t frozen) {
  if (frozen <= 0) return std::nullopt;
  CheckResult c = finding("reference/routing_margins", CheckKind::kRoutingMargins, "top-k margin of every perturbed logit");
  c.diagnosis = diagnosisOf(
      DiagnosisCode::kFdUnreliable, static_cast<double>(frozen),
      fmt::format("{} logits have a top-k margin below the smallest FD step (near-ties); their derivatives were taken "
                  "with the routing frozen, which is the gradient of the current routing piece",
                  frozen),
      "no action needed unless the checks fail; a different seed avoids the ties");
  return c;
}

CheckResult checkReplicas(int layer, const std::vector<ReplicaGradient>& replicas, double rtol) {
  CheckResult c;
  c.name = fmt::format("replicas/layer{}", layer);
  c.kind = CheckKind::kReplicas;
  c.layer = layer;
  c.rtol = rtol;
  if (replicas.size() < 2) {
    c.method = fmt::format("one rank (rank {}) holds the router: nothing to compare",
                           replicas.empty() ? -1 : replicas.front().rank);
    return c;
  }
  c.method = fmt::format("every rank holding the router against rank {}", replicas.front().rank);
  const std::vector<double>& first = *replicas.front().grad;
  std::vector<int> divergent;
  // The worst replica: the largest relative difference (NaN counts as the worst).
  CheckResult worst;
  worst.max_rel_err = -1.0;
  for (std::size_t i = 1; i < replicas.size(); ++i) {
    const CheckResult cmp = compareVectors(c.name, *replicas[i].grad, first, rtol, 0.0);
    c.elements += cmp.elements;
    c.wrong += cmp.wrong;
    if (!cmp.ok) divergent.push_back(replicas[i].rank);
    if (std::isnan(cmp.max_rel_err) || cmp.max_rel_err > worst.max_rel_err) worst = cmp;
  }
  c.scale = worst.scale;
  c.cosine = worst.cosine;
  c.max_abs_err = worst.max_abs_err;
  c.max_rel_err = worst.max_rel_err;
  c.ok = divergent.empty();
  if (c.ok) return c;
  std::string ranks;
  for (int r : divergent) ranks += (ranks.empty() ? "" : ", ") + std::to_string(r);
  c.diagnosis = diagnosisOf(
      DiagnosisCode::kReplicaDivergence, worst.max_rel_err,
      fmt::format(
          "ranks {} hold a different layer-{} router gradient than rank {} (worst: scale {:.9g}, cosine {:.10f}, max "
          "relative difference {:.3g}): a gradient all-reduce was skipped or its result overwritten on those ranks, "
          "or a partial gradient was treated as replicated (Megatron-LM #599, torchtitan #2387)",
          ranks, layer, replicas.front().rank, worst.scale, worst.cosine, worst.max_rel_err),
      "reduce the router gradient over every rank that holds the replica (the DP group, and TP "
      "where tokens are split over TP) before the optimizer step");
  return c;
}

CheckResult findRoutingDifferences(int layer, std::int64_t differing, std::int64_t rows) {
  CheckResult c = finding(fmt::format("routing/layer{}", layer), CheckKind::kRouting,
                          "recorded top-k against the top-k of the recorded scores (+ expert bias)");
  c.layer = layer;
  c.elements = rows;
  c.wrong = differing;  // the value: rows whose recorded top-k differs (#wrong/elements)
  if (differing == 0) return c;
  c.diagnosis = diagnosisOf(
      DiagnosisCode::kRoutingDiffers, static_cast<double>(differing),
      fmt::format("{} of {} rows were routed to experts other than the top-k of their recorded scores (capacity drops, "
                  "an expert bias not recorded, or ties); the reference uses the job's own routing",
                  differing, rows),
      fmt::format("no action needed unless unexpected; record layer{}.expert_bias when the job selects with a bias",
                  layer));
  return c;
}

bool expectationMet(const Expectation& expect, Verdict verdict, const std::vector<CheckResult>& checks,
                    std::string& detail) {
  if (verdict != expect.verdict) {
    detail = fmt::format("expected verdict '{}', got '{}'", toString(expect.verdict), toString(verdict));
    return false;
  }
  if (expect.diagnosis == DiagnosisCode::kNone && expect.factor.empty()) return true;
  std::vector<std::string> seen;
  for (const CheckResult& c : checks) {
    const Diagnosis& d = c.diagnosis;
    if (d.code == DiagnosisCode::kNone) continue;
    seen.push_back(std::string(toString(d.code)) + (d.factor.empty() ? "" : "(" + d.factor + ")"));
    if (expect.diagnosis != DiagnosisCode::kNone && d.code != expect.diagnosis) continue;
    if (!expect.factor.empty() && d.factor != expect.factor &&
        std::find(d.factor_alternatives.begin(), d.factor_alternatives.end(), expect.factor) ==
            d.factor_alternatives.end())
      continue;
    return true;
  }
  std::string got;
  for (const auto& s : seen) got += (got.empty() ? "" : ", ") + s;
  detail = fmt::format("expected diagnosis {}{} on some check; got {}",
                       expect.diagnosis == DiagnosisCode::kNone ? "(any)" : toString(expect.diagnosis),
                       expect.factor.empty() ? "" : " with factor " + expect.factor, got.empty() ? "none" : got);
  return false;
}

}  // namespace moe
