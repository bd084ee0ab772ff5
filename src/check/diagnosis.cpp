#include "check/diagnosis.hpp"

#include <algorithm>
#include <cmath>

#include <fmt/format.h>

namespace moe {
namespace {

struct Quantity {
  const char* name;
  double value;
};

std::vector<Quantity> distinguishable(const MeshQuantities& m) {
  std::vector<Quantity> q;
  auto add = [&](const char* n, double v) {
    if (v > 1) q.push_back({n, v});
  };
  add("dp", m.sizes.dp);
  add("cp", m.sizes.cp);
  add("M", m.sizes.microbatches);
  add("pp", m.sizes.pp);
  add("mbs", m.micro_batch_size);
  add("tokens", m.tokens);
  add("tp", m.sizes.tp);
  add("ep", m.sizes.ep);
  if (m.attribute_world) add("world", static_cast<double>(m.sizes.world()));
  return q;
}

std::string expressionOf(const std::vector<std::pair<std::string, int>>& terms) {
  std::string num, den;
  int n_den = 0;
  for (const auto& [name, exp] : terms) {
    std::string& side = exp > 0 ? num : den;
    if (!side.empty()) side += "*";
    side += name;
    if (exp < 0) ++n_den;
  }
  if (num.empty()) num = "1";
  if (den.empty()) return num;
  return n_den > 1 ? num + "/(" + den + ")" : num + "/" + den;
}

struct KnownFactor {
  const char* expression;
  const char* cause;
};

// Known signatures of shipped bugs; the measured factor is matched against these.
const KnownFactor kKnownFactors[] = {
    {"1/dp",
     "DP gradient averaging is not compensated: the aux loss is normalized by the global token count "
     "while its probabilities are local (Megatron-LM #3672), or the backward scale is unset"},
    {"1/cp",
     "each CP rank holds a partial aux loss while gradients are averaged over dp*cp: the backward "
     "scale lacks x cp (Megatron-LM #1652, fixed by PR #2237)"},
    {"M",
     "the aux gradient is summed over the gradient-accumulation microbatches: the backward scale "
     "lacks / M (NeMo Automodel between PR #1412 and PR #3359)"},
    {"M/cp",
     "the autoscaler's backward scale is unset (stays 1) while the main loss is divided by M and "
     "gradients are averaged over dp*cp (NeMo Automodel #1408)"},
    {"1/mbs",
     "sequence aux loss in per-token mode is premultiplied without x micro-batch size "
     "(Megatron-LM #5798)"},
    {"dp", "the aux loss is multiplied by the world size before DDP averaging (HF transformers #48690)"},
    {"cp",
     "statistics are all-reduced with an autograd-aware all-reduce whose backward sums the gradient "
     "over the group (torch.distributed.nn.all_reduce; pytorch #58005)"},
    {"dp*cp", "the aux loss is multiplied by the dp*cp world size before gradient averaging"},
};

}  // namespace

std::optional<FactorMatch> attributeFactor(double scale, const MeshQuantities& mesh, double rel_tol) {
  if (!(scale > 0) || !std::isfinite(scale)) return std::nullopt;
  const std::vector<Quantity> q = distinguishable(mesh);
  const int n = static_cast<int>(q.size());
  std::optional<FactorMatch> best;
  int best_terms = 99;
  int total = 1;
  for (int i = 0; i < n; ++i) total *= 3;
  // Enumerate exponent vectors in {-1,0,1}^n with at most three non-zero entries, simplest first.
  for (int terms = 0; terms <= 3; ++terms) {
    for (int code = 0; code < total; ++code) {
      int c = code, used = 0;
      double value = 1.0;
      std::vector<std::pair<std::string, int>> t;
      for (int i = 0; i < n; ++i, c /= 3) {
        const int exp = c % 3 == 0 ? 0 : (c % 3 == 1 ? 1 : -1);
        if (exp == 0) continue;
        ++used;
        value *= exp > 0 ? q[i].value : 1.0 / q[i].value;
        t.push_back({q[i].name, exp});
      }
      if (used != terms) continue;
      if (std::fabs(scale - value) > rel_tol * value) continue;
      const std::string expr = expressionOf(t);
      if (!best) {
        best = FactorMatch{expr, value, {}};
        best_terms = terms;
      } else if (terms == best_terms) {
        best->alternatives.push_back(expr);
      }
    }
    if (best) break;
  }
  return best;
}

void diagnoseAuxGradient(CheckResult& c, const MeshQuantities& mesh, const std::string& knob, double mesh_norm,
                         double reference_norm) {
  Diagnosis& d = c.diagnosis;
  if (reference_norm > 0 && mesh_norm <= 1e-12 * reference_norm) {
    d.code = DiagnosisCode::kAuxGradMissing;
    d.factor = "0";
    d.value = 0.0;
    d.cause = "the injected aux gradient never reaches the router weights (NeMo Automodel #1408: "
              "the return value of MoEAuxLossAutoScaler.apply() is discarded)";
    d.fix = "use the tensor returned by the injection (weights = MoEAuxLossAutoScaler.apply(weights, "
            "aux)) so the routing weights depend on it";
    return;
  }
  // Direction: the mesh optimizes a different objective (padding counted, counts from the wrong
  // token group, stale denominators).
  const double direction_tol = std::max(1e-9, 10 * c.rtol * c.rtol);
  if (!(c.cosine >= 1.0 - direction_tol)) {
    d.code = DiagnosisCode::kAuxGradDirection;
    d.factor = "";
    d.value = c.cosine;
    d.cause = fmt::format(
        "the mesh differentiates a different aux objective (cosine {:.9f}): the token set or the "
        "count group differs from the intended one (padding counted, counts per microbatch instead "
        "of per batch, a stale token denominator, groups weighted by tokens instead of uniformly)",
        c.cosine);
    d.fix = "make the aux statistics (counts, token totals, probabilities) cover exactly the "
            "intended token group: valid tokens only, all-reduced over the group's ranks";
    return;
  }
  const auto match = attributeFactor(c.scale, mesh, std::max(1e-6, 10 * c.rtol));
  if (match && match->expression == "1") {
    // Right scale, nearly right direction, yet elements beyond tolerance: the element pattern
    // differs slightly (rounding of a low-precision mesh, or a small difference of objective).
    d.code = DiagnosisCode::kAuxGradDirection;
    d.value = c.cosine;
    d.cause = fmt::format(
        "the aux gradient has scale {:.9g} and cosine {:.10f} but {} of {} elements lie beyond the "
        "tolerance: rounding of the mesh dtype, or a small difference of objective",
        c.scale, c.cosine, c.wrong, c.elements);
    d.fix = "for a low-precision mesh, loosen tolerance.rtol; otherwise compare the token sets and "
            "counts the mesh uses with the intended ones";
    return;
  }
  d.code = DiagnosisCode::kAuxGradScaled;
  d.value = c.scale;
  if (!match) {
    d.factor = "unexplained";
    d.cause = fmt::format("the aux gradient is {:.9g} x the reference, which no product of the mesh "
                          "quantities explains",
                          c.scale);
    d.fix = fmt::format("divide {} by {:.9g}", knob, c.scale);
    return;
  }
  d.factor = match->expression;
  d.factor_alternatives = match->alternatives;
  std::string also;
  for (const auto& a : match->alternatives) also += (also.empty() ? "" : ", ") + a;
  d.cause = fmt::format("the aux gradient is {:.9g} x the reference = {}{}", c.scale, d.factor,
                        also.empty() ? "" : " (here equal to " + also + ")");
  for (const auto& k : kKnownFactors)
    if (d.factor == k.expression) d.cause += ": " + std::string(k.cause);
  d.fix = fmt::format("divide {} by {} (i.e. multiply it by {:.9g})", knob, d.factor, 1.0 / c.scale);
}

}  // namespace moe
