// Closed-form checks of the float64 finite-difference reference (src/reference): values at
// perfect balance, scope equivalences, hand-derived gradients of the aux loss (softmax and sigmoid),
// the z-loss, empty groups, exact ties, the Richardson error estimate and the directional checks.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <vector>

#include "../reference_problem.hpp"
#include "data/problem.hpp"
#include "reference/reference.hpp"

namespace moe {
namespace {

// A hand-built problem with every tensor zero and every token valid.
ProblemData emptyProblem(int batch, int seq_len, int hidden, int experts, int ffn, int layers) {
  ProblemData d = problemShapeOf(test::problemScenario(0, batch, seq_len, hidden, experts, ffn, layers, {}));
  const std::size_t T = std::size_t(batch) * seq_len;
  d.x.assign(T * hidden, 0.0);
  d.y.assign(T * hidden, 0.0);
  d.valid.assign(T, 1);
  d.router_weight.assign(layers, std::vector<double>(std::size_t(hidden) * experts, 0.0));
  d.expert_in.assign(layers, std::vector<double>(std::size_t(experts) * hidden * ffn, 0.0));
  d.expert_out.assign(layers, std::vector<double>(std::size_t(experts) * ffn * hidden, 0.0));
  return d;
}

// A random problem from the data generator (x, y ~ N(0,1), logits ~ N(0,1)).
ProblemData randomProblem(std::uint64_t seed, int batch, int seq_len, int hidden, int experts, int ffn,
                          int layers, std::vector<int> valid_lengths = {}) {
  return generateProblem(
      test::problemScenario(seed, batch, seq_len, hidden, experts, ffn, layers, std::move(valid_lengths)));
}

ObjectiveDefinition auxOnly(ScoreFunction score, int top_k, AuxScope scope, double alpha) {
  ObjectiveDefinition o;
  o.score = score;
  o.top_k = top_k;
  o.aux_scope = scope;
  o.aux_coeff = alpha;
  o.z_coeff = 0.0;
  return o;
}

ReferenceOptions auxOptions() {
  ReferenceOptions options;
  options.with_main = false;
  options.directional_checks = 0;
  return options;
}

double maxAbs(const std::vector<double>& v) {
  double m = 0.0;
  for (double x : v) m = std::max(m, std::abs(x));
  return m;
}

// max |a - b| / max |b|
double relDiff(const std::vector<double>& a, const std::vector<double>& b) {
  EXPECT_EQ(a.size(), b.size());
  double diff = 0.0;
  for (std::size_t i = 0; i < a.size() && i < b.size(); ++i) diff = std::max(diff, std::abs(a[i] - b[i]));
  const double scale = maxAbs(b);
  return scale > 0.0 ? diff / scale : diff;
}

// z = x W for layer 0, [T, E].
std::vector<double> layer0Logits(const ProblemData& d) {
  const std::size_t T = d.tokens();
  std::vector<double> z(T * d.experts, 0.0);
  for (std::size_t t = 0; t < T; ++t)
    for (int i = 0; i < d.hidden; ++i)
      for (int e = 0; e < d.experts; ++e)
        z[t * d.experts + e] += d.x[t * d.hidden + i] * d.router_weight[0][std::size_t(i) * d.experts + e];
  return z;
}

// dJ/dW = x^T dJ/dz for layer 0.
std::vector<double> chainRule(const ProblemData& d, const std::vector<double>& grad_z) {
  std::vector<double> g(std::size_t(d.hidden) * d.experts, 0.0);
  for (std::size_t t = 0; t < std::size_t(d.tokens()); ++t)
    for (int i = 0; i < d.hidden; ++i)
      for (int e = 0; e < d.experts; ++e)
        g[std::size_t(i) * d.experts + e] += d.x[t * d.hidden + i] * grad_z[t * d.experts + e];
  return g;
}

std::vector<double> softmaxRow(const double* z, int E) {
  const double m = *std::max_element(z, z + E);
  std::vector<double> p(E);
  double s = 0.0;
  for (int e = 0; e < E; ++e) s += (p[e] = std::exp(z[e] - m));
  for (auto& v : p) v /= s;
  return p;
}

std::vector<int> topkRow(const double* z, int E, int k) {
  std::vector<int> order(E);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return z[a] > z[b]; });
  order.resize(k);
  return order;
}

// Hand-derived gradient of a single-layer softmax aux loss over one group of all tokens:
// dJ/dz_{t,j} = w p_{t,j} (c_j - sum_e c_e p_{t,e}), w = alpha E / (k T^2).
std::vector<double> analyticSoftmaxAuxGrad(const ProblemData& d, int k, double alpha) {
  const int E = d.experts;
  const std::size_t T = d.tokens();
  const auto z = layer0Logits(d);
  std::vector<double> counts(E, 0.0);
  for (std::size_t t = 0; t < T; ++t)
    for (int e : topkRow(&z[t * E], E, k)) counts[e] += 1.0;
  const double w = alpha * E / (k * double(T) * double(T));
  std::vector<double> grad_z(T * E);
  for (std::size_t t = 0; t < T; ++t) {
    const auto p = softmaxRow(&z[t * E], E);
    double cp = 0.0;
    for (int e = 0; e < E; ++e) cp += counts[e] * p[e];
    for (int j = 0; j < E; ++j) grad_z[t * E + j] = w * p[j] * (counts[j] - cp);
  }
  return chainRule(d, grad_z);
}

// Each of E experts gets the same number of tokens: token t has a one-hot input at t % E and the
// identity router, so it routes to expert t % E; zero experts keep h_l = x in every layer.
TEST(ReferenceClosedForm, PerfectBalanceGivesExactlyOnePerLayer) {
  const int E = 4, layers = 3;
  ProblemData d = emptyProblem(/*batch=*/2, /*seq_len=*/8, /*hidden=*/E, E, /*ffn=*/2, layers);
  for (std::size_t t = 0; t < std::size_t(d.tokens()); ++t) d.x[t * E + t % E] = 1.5;
  for (int l = 0; l < layers; ++l)
    for (int e = 0; e < E; ++e) d.router_weight[l][std::size_t(e) * E + e] = 1.0;
  for (AuxScope scope : {AuxScope::kMicroBatch, AuxScope::kSequence, AuxScope::kGlobalBatch}) {
    for (ScoreFunction score : {ScoreFunction::kSoftmax, ScoreFunction::kSigmoid}) {
      const double alpha = 0.01;
      const ObjectiveValue value = evaluateObjective(d, auxOnly(score, 1, scope, alpha));
      EXPECT_NEAR(value.aux, alpha * layers, 1e-15 * alpha * layers) << toString(scope) << toString(score);
    }
  }
}

// With one sequence per (DP replica, microbatch) group the micro_batch and sequence scopes define the
// same objective; so do they at B = 1.
TEST(ReferenceScopes, SequenceEqualsMicroBatchWhenEachGroupIsOneSequence) {
  struct Case {
    int batch, dp, microbatches;
  };
  for (const Case c : {Case{4, 2, 2}, Case{1, 1, 1}}) {
    ProblemData d = randomProblem(11, c.batch, 6, 8, 6, 4, 2);
    ObjectiveDefinition micro = auxOnly(ScoreFunction::kSoftmax, 2, AuxScope::kMicroBatch, 0.01);
    micro.mesh.dp = c.dp;
    micro.mesh.microbatches = c.microbatches;
    ObjectiveDefinition sequence = micro;
    sequence.aux_scope = AuxScope::kSequence;
    const auto vm = evaluateObjective(d, micro), vs = evaluateObjective(d, sequence);
    EXPECT_NEAR(vm.aux, vs.aux, 1e-15 * std::abs(vs.aux));
    const auto rm = computeReference(d, micro, auxOptions()), rs = computeReference(d, sequence, auxOptions());
    for (int l = 0; l < d.layers; ++l) EXPECT_LT(relDiff(rm.layers[l].aux_grad, rs.layers[l].aux_grad), 1e-14);
    EXPECT_NEAR(rm.aux_value, vm.aux, 1e-15 * std::abs(vm.aux));
  }
}

// Sigmoid scores: aux probabilities p = s / sum s (no epsilon). One token, E = 3, k = 1, routed to
// expert 0: J = alpha * E * p_0, dJ/dz_j = alpha E (delta_0j s_0' S - s_0 s_j') / S^2, s' = s(1 - s).
TEST(ReferenceClosedForm, SigmoidNormalizationOneToken) {
  const int E = 3, H = 3;
  ProblemData d = emptyProblem(1, 1, H, E, 1, 1);
  d.x = {0.7, -1.1, 0.4};
  d.router_weight[0] = {2.2, -0.3, 0.5, 0.2, 0.9, -0.4, 0.1, 0.3, 0.8};  // z = (1.36, -1.08, 1.11)
  const auto z = layer0Logits(d);
  ASSERT_EQ(topkRow(z.data(), E, 1)[0], 0) << "the example is built to route to expert 0";
  const double alpha = 0.1;
  std::vector<double> s(E), ds(E);
  double S = 0.0;
  for (int e = 0; e < E; ++e) {
    s[e] = 1.0 / (1.0 + std::exp(-z[e]));
    ds[e] = s[e] * (1.0 - s[e]);
    S += s[e];
  }
  std::vector<double> grad_z(E);
  for (int j = 0; j < E; ++j) grad_z[j] = alpha * E * ((j == 0 ? ds[0] * S : 0.0) - s[0] * ds[j]) / (S * S);
  const auto expected = chainRule(d, grad_z);
  const ObjectiveDefinition o = auxOnly(ScoreFunction::kSigmoid, 1, AuxScope::kGlobalBatch, alpha);
  EXPECT_NEAR(evaluateObjective(d, o).aux, alpha * E * s[0] / S, 1e-15);
  const auto r = computeReference(d, o, auxOptions());
  EXPECT_LT(relDiff(r.layers[0].aux_grad, expected), 1e-11);
}

// Single-layer softmax, one group: dJ/dz_{t,e} = p_e (c_e - sum_j c_j p_j) * alpha E / (k T^2).
TEST(ReferenceClosedForm, SoftmaxAuxGradientMatchesHandDerivation) {
  for (int k : {1, 2, 3}) {
    ProblemData d = randomProblem(3 + k, 2, 5, 6, 5, 3, 1);
    const double alpha = 0.02;
    const ObjectiveDefinition o = auxOnly(ScoreFunction::kSoftmax, k, AuxScope::kGlobalBatch, alpha);
    const auto r = computeReference(d, o, auxOptions());
    EXPECT_LT(relDiff(r.layers[0].aux_grad, analyticSoftmaxAuxGrad(d, k, alpha)), 1e-11) << "k=" << k;
  }
}

// z-loss: d(lse^2)/dz = 2 lse softmax(z); micro_batch scope weights beta / (T_G * groups) with unequal
// group sizes (padding), global scope beta / T.
TEST(ReferenceClosedForm, ZLossGradientIsTwoLseSoftmax) {
  for (ZLossScope scope : {ZLossScope::kMicroBatch, ZLossScope::kGlobalBatch}) {
    for (ScoreFunction score : {ScoreFunction::kSoftmax, ScoreFunction::kSigmoid}) {
      ProblemData d = randomProblem(21, 4, 5, 6, 5, 3, 1, {5, 2, 4, 0});
      ObjectiveDefinition o = auxOnly(score, 2, AuxScope::kGlobalBatch, 0.0);
      o.z_coeff = 0.3;
      o.z_scope = scope;
      o.mesh.dp = 2;
      o.mesh.microbatches = 1;
      const int E = d.experts, S = d.seq_len;
      const auto z = layer0Logits(d);
      // Valid tokens per micro_batch group (2 sequences each).
      std::vector<double> group_tokens(2, 0.0);
      double all = 0.0;
      for (std::size_t t = 0; t < std::size_t(d.tokens()); ++t)
        if (d.valid[t]) group_tokens[(t / S) / 2] += 1.0, all += 1.0;
      double value = 0.0;
      std::vector<double> grad_z(z.size(), 0.0);
      for (std::size_t t = 0; t < std::size_t(d.tokens()); ++t) {
        if (!d.valid[t]) continue;
        const double weight = scope == ZLossScope::kGlobalBatch ? o.z_coeff / all
                                                                : o.z_coeff / (group_tokens[(t / S) / 2] * 2.0);
        const auto p = softmaxRow(&z[t * E], E);
        const double m = *std::max_element(&z[t * E], &z[t * E] + E);
        double sum = 0.0;
        for (int e = 0; e < E; ++e) sum += std::exp(z[t * E + e] - m);
        const double lse = m + std::log(sum);
        value += weight * lse * lse;
        for (int e = 0; e < E; ++e) grad_z[t * E + e] = weight * 2.0 * lse * p[e];
      }
      EXPECT_NEAR(evaluateObjective(d, o).z, value, 1e-14 * value);
      const auto r = computeReference(d, o, auxOptions());
      EXPECT_NEAR(r.z_value, value, 1e-14 * value);
      EXPECT_LT(relDiff(r.layers[0].aux_grad, chainRule(d, grad_z)), 1e-11) << toString(scope);
    }
  }
}

// A sequence with no valid token is an empty sequence group: counted, and left out of the mean, so
// the objective equals the one of the batch without it.
TEST(ReferenceGroups, EmptyGroupsAreCountedAndLeftOut) {
  ProblemData d = randomProblem(5, 3, 4, 6, 5, 3, 2, {4, 0, 3});
  ProblemData without = d;
  without.batch = 2;
  const std::size_t row = std::size_t(d.seq_len) * d.hidden;
  auto drop = [&](std::vector<double>& v) { v.erase(v.begin() + row, v.begin() + 2 * row); };
  drop(without.x);
  drop(without.y);
  without.valid.erase(without.valid.begin() + d.seq_len, without.valid.begin() + 2 * d.seq_len);
  const ObjectiveDefinition o = auxOnly(ScoreFunction::kSoftmax, 2, AuxScope::kSequence, 0.01);
  const auto r = computeReference(d, o, auxOptions());
  const auto r2 = computeReference(without, o, auxOptions());
  EXPECT_EQ(r.empty_groups, 1);
  EXPECT_EQ(r2.empty_groups, 0);
  EXPECT_NEAR(r.aux_value, r2.aux_value, 1e-15 * r2.aux_value);
  for (int l = 0; l < d.layers; ++l) EXPECT_LT(relDiff(r.layers[l].aux_grad, r2.layers[l].aux_grad), 1e-13);
  // micro_batch scope with dp = 3: the same sequence is an empty (replica, microbatch) group.
  ObjectiveDefinition micro = o;
  micro.aux_scope = AuxScope::kMicroBatch;
  micro.mesh.dp = 3;
  EXPECT_EQ(computeReference(d, micro, auxOptions()).empty_groups, 1);
  // All tokens in the aux set when padding is not excluded: no empty group.
  micro.exclude_padding = false;
  EXPECT_EQ(computeReference(d, micro, auxOptions()).empty_groups, 0);
}

// Token-weighted groups (aux.group_weighting "tokens"): J = alpha sum_G (T_G / sum T) L_bal(G); with
// sequence groups that is the token-weighted sum of each sequence's objective on its own.
TEST(ReferenceGroups, TokenWeightedGroupsWeighSequencesByTheirTokens) {
  const std::vector<int> lengths = {5, 2, 4};
  ProblemData d = randomProblem(23, 3, 5, 6, 5, 3, 2, lengths);
  ObjectiveDefinition o = auxOnly(ScoreFunction::kSoftmax, 2, AuxScope::kSequence, 0.01);
  o.group_weighting = GroupWeighting::kTokens;
  double expected = 0.0;
  const std::size_t row = std::size_t(d.seq_len) * d.hidden;
  for (int b = 0; b < d.batch; ++b) {
    ProblemData one = d;
    one.batch = 1;
    one.x.assign(d.x.begin() + b * row, d.x.begin() + (b + 1) * row);
    one.y.assign(d.y.begin() + b * row, d.y.begin() + (b + 1) * row);
    one.valid.assign(d.valid.begin() + b * d.seq_len, d.valid.begin() + (b + 1) * d.seq_len);
    expected += lengths[b] / 11.0 * evaluateObjective(one, o).aux;
  }
  EXPECT_NEAR(evaluateObjective(d, o).aux, expected, 1e-14 * expected);
  EXPECT_NEAR(computeReference(d, o, auxOptions()).aux_value, expected, 1e-14 * expected);
  // Equal group sizes: token weighting is the uniform mean.
  ProblemData full = randomProblem(23, 3, 5, 6, 5, 3, 2);
  ObjectiveDefinition uniform = o;
  uniform.group_weighting = GroupWeighting::kUniform;
  const auto rt = computeReference(full, o, auxOptions()), ru = computeReference(full, uniform, auxOptions());
  EXPECT_NEAR(rt.aux_value, ru.aux_value, 1e-15 * ru.aux_value);
  for (int l = 0; l < full.layers; ++l) EXPECT_LT(relDiff(rt.layers[l].aux_grad, ru.layers[l].aux_grad), 1e-14);
}

// Two exactly tied logits (router columns 0 and 1 equal): every token routes to expert 0 (lower
// index), the margins of experts 0 and 1 are 0, so their elements are evaluated with frozen routing
// and reported; the gradient is the analytic one of that frozen routing.
TEST(ReferenceRouting, ExactTiesAreFrozenAndReported) {
  ProblemData d = randomProblem(8, 2, 4, 5, 4, 3, 1);
  const int E = d.experts;
  for (int i = 0; i < d.hidden; ++i) d.router_weight[0][std::size_t(i) * E + 1] = d.router_weight[0][std::size_t(i) * E];
  const auto z = layer0Logits(d);
  for (std::size_t t = 0; t < std::size_t(d.tokens()); ++t) ASSERT_EQ(z[t * E], z[t * E + 1]);
  const double alpha = 0.05;
  const ObjectiveDefinition o = auxOnly(ScoreFunction::kSoftmax, 1, AuxScope::kGlobalBatch, alpha);
  const auto r = computeReference(d, o, auxOptions());
  // Tokens where the tied pair is the top: 2 frozen elements each.
  std::int64_t tied_on_top = 0;
  for (std::size_t t = 0; t < std::size_t(d.tokens()); ++t) tied_on_top += topkRow(&z[t * E], E, 1)[0] == 0 ? 1 : 0;
  ASSERT_GT(tied_on_top, 0);
  EXPECT_GE(r.frozen_elements, 2 * tied_on_top);
  EXPECT_GE(r.near_ties, r.frozen_elements);
  EXPECT_LT(relDiff(r.layers[0].aux_grad, analyticSoftmaxAuxGrad(d, 1, alpha)), 1e-11);
}

// A near tie (margin 1e-5) shrinks the step (near_ties) without freezing.
TEST(ReferenceRouting, NearTieShrinksTheStep) {
  ProblemData d = emptyProblem(1, 1, 3, 3, 1, 1);
  d.x = {1.0, 0.0, 0.0};
  d.router_weight[0] = {0.3, 0.3 - 1e-5, -0.2, 0, 0, 0, 0, 0, 0};
  const auto r = computeReference(d, auxOnly(ScoreFunction::kSoftmax, 1, AuxScope::kGlobalBatch, 0.1), auxOptions());
  EXPECT_EQ(r.near_ties, 2);
  EXPECT_EQ(r.frozen_elements, 0);
  EXPECT_LT(r.max_step, 1.0001e-3);
  EXPECT_LT(relDiff(r.layers[0].aux_grad, analyticSoftmaxAuxGrad(d, 1, 0.1)), 1e-10);
}

// On a smooth problem the Richardson error estimate is tiny.
TEST(ReferenceAccuracy, RichardsonEstimateIsSmall) {
  ProblemData d = randomProblem(13, 4, 8, 16, 8, 8, 2, {8, 5, 8, 3});
  ObjectiveDefinition o = auxOnly(ScoreFunction::kSoftmax, 2, AuxScope::kMicroBatch, 0.01);
  o.z_coeff = 1e-3;
  o.mesh.dp = 2;
  ReferenceOptions options;
  options.directional_checks = 0;
  const auto r = computeReference(d, o, options);
  double scale = 0.0;
  for (const auto& layer : r.layers) scale = std::max(scale, maxAbs(layer.aux_grad));
  ASSERT_GT(scale, 0.0);
  EXPECT_LT(r.fd_error_estimate / scale, 1e-9);
  for (const auto& layer : r.layers) EXPECT_LT(layer.main_fd_error / maxAbs(layer.main_grad), 1e-9);
  EXPECT_FALSE(r.method.empty());
}

// Single layer, softmax, one group: the directional derivative equals <analytic gradient, V>.
TEST(ReferenceAccuracy, DirectionalDerivativeEqualsAnalyticGradientDotDirection) {
  ProblemData d = randomProblem(19, 2, 6, 8, 6, 3, 1);
  const double alpha = 0.01;
  ReferenceOptions options = auxOptions();
  options.directional_checks = 2;
  const auto r = computeReference(d, auxOnly(ScoreFunction::kSoftmax, 2, AuxScope::kGlobalBatch, alpha), options);
  const auto analytic = analyticSoftmaxAuxGrad(d, 2, alpha);
  ASSERT_EQ(r.directional.size(), 2u);
  double norm = 0.0;
  for (double g : analytic) norm += g * g;
  norm = std::sqrt(norm);
  for (const auto& check : r.directional) {
    double dot = 0.0;
    for (std::size_t i = 0; i < analytic.size(); ++i) dot += analytic[i] * check.direction[0][i];
    EXPECT_NEAR(check.derivative, dot, 1e-10 * norm);
  }
  // Different directions, deterministic in the seed.
  EXPECT_NE(r.directional[0].direction[0], r.directional[1].direction[0]);
  const auto again = computeReference(d, auxOnly(ScoreFunction::kSoftmax, 2, AuxScope::kGlobalBatch, alpha), options);
  EXPECT_EQ(again.directional[0].direction[0], r.directional[0].direction[0]);
}

// The directional derivative along V equals <grad, V> (grad from the per-logit differences and the
// chain rule, V unit over all layers).
TEST(ReferenceAccuracy, DirectionalDerivativeEqualsGradientDotDirection) {
  for (ScoreFunction score : {ScoreFunction::kSoftmax, ScoreFunction::kSigmoid}) {
    ProblemData d = randomProblem(17, 2, 6, 8, 6, 5, 3, {6, 4});
    ObjectiveDefinition o = auxOnly(score, 2, AuxScope::kSequence, 0.01);
    o.z_coeff = 1e-3;
    o.norm_topk_prob = score == ScoreFunction::kSigmoid;
    ReferenceOptions options;
    options.directional_checks = 3;
    const auto r = computeReference(d, o, options);
    ASSERT_EQ(r.directional.size(), 3u);
    double grad_norm_sq = 0.0;
    for (const auto& layer : r.layers)
      for (double g : layer.aux_grad) grad_norm_sq += g * g;
    for (const auto& check : r.directional) {
      double dot = 0.0, norm_sq = 0.0;
      for (int l = 0; l < d.layers; ++l)
        for (std::size_t i = 0; i < check.direction[l].size(); ++i) {
          dot += r.layers[l].aux_grad[i] * check.direction[l][i];
          norm_sq += check.direction[l][i] * check.direction[l][i];
        }
      EXPECT_NEAR(norm_sq, 1.0, 1e-12);
      EXPECT_NEAR(check.derivative, dot, 1e-9 * std::sqrt(grad_norm_sq));
      EXPECT_LT(check.fd_error, 1e-9 * std::sqrt(grad_norm_sq));
    }
  }
}

// Multi-layer aux and main gradients against plain central differences of the whole objective
// (evaluateObjective, routing recomputed): an independent, less precise check of the suffix path.
TEST(ReferenceAccuracy, MultiLayerMatchesWholeObjectiveDifferences) {
  for (ScoreFunction score : {ScoreFunction::kSoftmax, ScoreFunction::kSigmoid}) {
    ProblemData d = randomProblem(29, 2, 3, 5, 4, 3, 3, {3, 2});
    ObjectiveDefinition o = auxOnly(score, 2, AuxScope::kMicroBatch, 0.1);
    o.z_coeff = 0.01;
    o.norm_topk_prob = score == ScoreFunction::kSoftmax;
    o.main_scope = MainLossScope::kTokenMean;
    ReferenceOptions options;
    options.directional_checks = 0;
    const auto r = computeReference(d, o, options);
    const double h = 1e-6;
    for (int l = 0; l < d.layers; ++l) {
      std::vector<double> fd_aux(r.layers[l].aux_grad.size()), fd_main(fd_aux.size());
      for (std::size_t i = 0; i < fd_aux.size(); ++i) {
        ProblemData p = d;
        p.router_weight[l][i] += h;
        const auto up = evaluateObjective(p, o);
        p.router_weight[l][i] -= 2 * h;
        const auto down = evaluateObjective(p, o);
        fd_aux[i] = ((up.aux + up.z) - (down.aux + down.z)) / (2 * h);
        fd_main[i] = (up.main - down.main) / (2 * h);
      }
      EXPECT_LT(relDiff(r.layers[l].aux_grad, fd_aux), 1e-6) << "layer " << l;
      EXPECT_LT(relDiff(r.layers[l].main_grad, fd_main), 1e-6) << "layer " << l;
    }
  }
}

TEST(ReferenceObjective, IntendedObjectiveTakesMainScopeFromPreset) {
  Scenario sc;
  sc.model.top_k = 3;
  sc.aux.type = AuxScope::kGlobalBatch;
  sc.mesh.dp = 4;
  sc.framework.preset = Preset::kTorchtitan;
  ObjectiveDefinition o = intendedObjective(sc);
  EXPECT_EQ(o.top_k, 3);
  EXPECT_EQ(o.aux_scope, AuxScope::kGlobalBatch);
  EXPECT_EQ(o.mesh.dp, 4);
  EXPECT_EQ(o.main_scope, MainLossScope::kTokenMean);
  EXPECT_EQ(o.group_weighting, GroupWeighting::kTokens);  // the preset's, resolved
  sc.framework.preset = Preset::kMegatron;
  EXPECT_EQ(intendedObjective(sc).main_scope, MainLossScope::kMicrobatchMean);
  EXPECT_EQ(intendedObjective(sc).group_weighting, GroupWeighting::kUniform);
}


// The per-token basis of the layer below the last (TokenSuffixBasis: the last layer's expert inputs
// and the main loss regrouped on 2k + kF rows) and the general per-evaluation propagation, with the
// experts' output rows kept or recomputed (as at real sizes), are the same arithmetic regrouped: every gradient agrees to 1e-12 relative to its largest element, over
// softmax/sigmoid, normalized gates, z-loss and padding, at 2 layers (where the basis applies) and at
// 3 (where it applies to the second layer only).
TEST(ReferenceSuffixBasis, AgreesWithTheGeneralPropagation) {
  struct Case {
    ScoreFunction score;
    bool norm;
    int layers, top_k, ffn;
    double z;
  };
  const Case cases[] = {{ScoreFunction::kSoftmax, false, 2, 2, 4, 0.0}, {ScoreFunction::kSoftmax, true, 2, 3, 5, 0.01},
                        {ScoreFunction::kSigmoid, true, 2, 2, 3, 0.0},  {ScoreFunction::kSigmoid, false, 3, 2, 4, 0.01},
                        {ScoreFunction::kSoftmax, true, 3, 3, 2, 0.0}};
  for (const Case& c : cases) {
    const ProblemData d = randomProblem(41 + c.layers + c.top_k, 3, 6, 7, 6, c.ffn, c.layers, {6, 4, 5});
    ObjectiveDefinition o = auxOnly(c.score, c.top_k, AuxScope::kMicroBatch, 0.05);
    o.z_coeff = c.z;
    o.norm_topk_prob = c.norm;
    o.main_scope = MainLossScope::kTokenMean;
    ReferenceOptions basis, general, recomputed;
    basis.suffix_basis = SuffixBasis::kAlways;
    general.suffix_basis = SuffixBasis::kNever;
    recomputed.suffix_basis = SuffixBasis::kAlways;
    recomputed.max_kept_expert_output_bytes = 0;  // every expert output row recomputed, as at real sizes
    const ReferenceResult rb = computeReference(d, o, basis), rg = computeReference(d, o, general);
    const ReferenceResult rr = computeReference(d, o, recomputed);
    ReferenceOptions general_recomputed = general;
    general_recomputed.max_kept_expert_output_bytes = 0;
    const ReferenceResult rgr = computeReference(d, o, general_recomputed);
    const std::string what = std::string(c.score == ScoreFunction::kSoftmax ? "softmax" : "sigmoid") + " L=" +
                             std::to_string(c.layers) + " k=" + std::to_string(c.top_k);
    for (int l = 0; l < d.layers; ++l) {
      EXPECT_LT(relDiff(rb.layers[l].aux_grad, rg.layers[l].aux_grad), 1e-12) << what << " layer " << l;
      EXPECT_LT(relDiff(rb.layers[l].main_grad, rg.layers[l].main_grad), 1e-12) << what << " layer " << l;
      for (const ReferenceResult* r : {&rr, &rgr}) {
        EXPECT_LT(relDiff(r->layers[l].aux_grad, rg.layers[l].aux_grad), 1e-12) << what << " recomputed, layer " << l;
        EXPECT_LT(relDiff(r->layers[l].main_grad, rg.layers[l].main_grad), 1e-12) << what << " recomputed, layer " << l;
      }
    }
    EXPECT_EQ(rb.frozen_elements, rg.frozen_elements) << what;
    ASSERT_EQ(rb.directional.size(), rg.directional.size());
    for (std::size_t i = 0; i < rb.directional.size(); ++i)
      EXPECT_NEAR(rb.directional[i].derivative, rg.directional[i].derivative,
                  1e-12 * std::abs(rg.directional[i].derivative)) << what;
  }
}

}  // namespace
}  // namespace moe
