// The finite-difference reference (src/reference) against an independent float64 LibTorch autograd
// implementation of the same objective, written here from the definitions and sharing no
// code with src/model or src/sim: counts detached, routing by a stable descending torch::sort of the
// scores (ties -> lower expert index). Table-driven over score functions, norm_topk_prob, layers,
// padding, aux and z-loss scopes, group weighting and main-loss scopes.
#include <torch/torch.h>

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include "data/problem.hpp"
#include "reference/reference.hpp"
#include "../reference_problem.hpp"

namespace moe {
namespace {

struct AutogradResult {
  std::vector<std::vector<double>> aux_grad;   // per layer [H*E], d(J_aux + J_z)/dW_l
  std::vector<std::vector<double>> main_grad;  // per layer [H*E], dJ_main/dW_l
  double aux = 0.0, z = 0.0, main = 0.0;
};

std::vector<double> toVector(const torch::Tensor& t) {
  const torch::Tensor c = t.detach().contiguous().to(torch::kCPU);
  return std::vector<double>(c.data_ptr<double>(), c.data_ptr<double>() + c.numel());
}

torch::Tensor fromVector(const std::vector<double>& v, torch::IntArrayRef shape) {
  return torch::from_blob(const_cast<double*>(v.data()), shape, torch::TensorOptions().dtype(torch::kFloat64))
      .clone();
}

// Average over the non-empty groups of f(group's member indices) (empty groups left out):
// uniform mean, or weighted by the groups' token counts (aux.group_weighting "tokens").
template <typename Fn>
torch::Tensor meanOverGroups(const std::vector<std::vector<int64_t>>& groups, Fn f,
                             GroupWeighting weighting = GroupWeighting::kUniform) {
  std::vector<torch::Tensor> terms;
  std::vector<double> sizes;
  for (const auto& members : groups) {
    if (members.empty()) continue;
    terms.push_back(f(torch::tensor(members, torch::kLong)));
    sizes.push_back(double(members.size()));
  }
  if (terms.empty()) return torch::zeros({}, torch::kFloat64);
  if (weighting != GroupWeighting::kTokens) return torch::stack(terms).mean();
  const torch::Tensor w = torch::tensor(sizes, torch::kFloat64);
  return (torch::stack(terms) * w).sum() / w.sum();
}

AutogradResult autogradObjective(const ProblemData& d, const ObjectiveDefinition& o) {
  const int64_t B = d.batch, S = d.seq_len, T = B * S, H = d.hidden, E = d.experts, F = d.ffn;
  const int L = d.layers, k = o.top_k;
  const torch::Tensor x = fromVector(d.x, {T, H});
  const torch::Tensor y = fromVector(d.y, {T, H});
  std::vector<torch::Tensor> W, A, Bout;
  for (int l = 0; l < L; ++l) {
    W.push_back(fromVector(d.router_weight[l], {H, E}).requires_grad_(true));
    A.push_back(fromVector(d.expert_in[l], {E, H, F}));
    Bout.push_back(fromVector(d.expert_out[l], {E, F, H}));
  }
  // Token groups: micro_batch chunks of B/(dp*M) sequences, sequences, the global batch.
  const int64_t per_chunk = B / (o.mesh.dp * o.mesh.microbatches);
  auto inAux = [&](int64_t t) { return !o.exclude_padding || d.valid[t] != 0; };
  std::vector<std::vector<int64_t>> chunks(B / per_chunk), sequences(B), global(1), chunk_valid(B / per_chunk);
  std::vector<int64_t> valid_tokens;
  for (int64_t t = 0; t < T; ++t) {
    if (d.valid[t]) {
      chunk_valid[(t / S) / per_chunk].push_back(t);
      valid_tokens.push_back(t);
    }
    if (!inAux(t)) continue;
    chunks[(t / S) / per_chunk].push_back(t);
    sequences[t / S].push_back(t);
    global[0].push_back(t);
  }
  const auto& aux_groups =
      o.aux_scope == AuxScope::kMicroBatch ? chunks : o.aux_scope == AuxScope::kSequence ? sequences : global;
  const auto& z_groups = o.z_scope == ZLossScope::kMicroBatch ? chunks : global;

  torch::Tensor h = x;
  torch::Tensor aux_total = torch::zeros({}, torch::kFloat64), z_total = torch::zeros({}, torch::kFloat64);
  for (int l = 0; l < L; ++l) {
    const torch::Tensor z = h.mm(W[l]);
    const bool softmax = o.score == ScoreFunction::kSoftmax;
    const torch::Tensor scores = softmax ? torch::softmax(z, 1) : torch::sigmoid(z);
    const torch::Tensor p = softmax ? scores : scores / scores.sum(1, true);
    const torch::Tensor order = std::get<1>(torch::sort(scores.detach(), /*stable=*/true, /*dim=*/1, /*descending=*/true));
    const torch::Tensor topk = order.slice(1, 0, k);
    const torch::Tensor routed = torch::zeros({T, E}, torch::kFloat64).scatter_(1, topk, 1.0);  // no grad
    // L_bal(G) = E/(k T_G) sum_e c_e P_e (Megatron switch_load_balancing_loss_func; DeepSeek-V3 eq. 17-20)
    aux_total = aux_total + o.aux_coeff * meanOverGroups(aux_groups, [&](const torch::Tensor& m) {
                  const double Tg = double(m.size(0));
                  const torch::Tensor c = routed.index_select(0, m).sum(0);
                  const torch::Tensor P = p.index_select(0, m).mean(0);
                  return double(E) / (k * Tg) * (c * P).sum();
                }, o.group_weighting);
    const torch::Tensor lse_sq = torch::logsumexp(z, {1}).pow(2);
    z_total = z_total + o.z_coeff * meanOverGroups(z_groups, [&](const torch::Tensor& m) {
                return lse_sq.index_select(0, m).mean();
              }, o.group_weighting);
    torch::Tensor gates = scores.gather(1, topk);
    if (o.norm_topk_prob) gates = gates / gates.sum(1, true);
    torch::Tensor mix = torch::zeros({T, H}, torch::kFloat64);
    for (int64_t e = 0; e < E; ++e) {
      const torch::Tensor weight = (gates * (topk == e).to(torch::kFloat64)).sum(1, true);
      mix = mix + weight * torch::tanh(h.mm(A[l][e])).mm(Bout[l][e]);
    }
    h = h + mix;
  }
  const torch::Tensor per_token = 0.5 * (h - y).pow(2).sum(1);
  torch::Tensor main_loss;
  if (o.main_scope == MainLossScope::kTokenMean) {
    main_loss = per_token.index_select(0, torch::tensor(valid_tokens, torch::kLong)).mean();
  } else {
    main_loss = meanOverGroups(chunk_valid, [&](const torch::Tensor& m) { return per_token.index_select(0, m).mean(); });
  }

  AutogradResult r;
  r.aux = aux_total.item<double>();
  r.z = z_total.item<double>();
  r.main = main_loss.item<double>();
  const auto aux_grads = torch::autograd::grad({aux_total + z_total}, W, {}, /*retain_graph=*/true,
                                               /*create_graph=*/false, /*allow_unused=*/true);
  const auto main_grads = torch::autograd::grad({main_loss}, W, {}, false, false, true);
  for (int l = 0; l < L; ++l) {
    r.aux_grad.push_back(aux_grads[l].defined() ? toVector(aux_grads[l]) : std::vector<double>(H * E, 0.0));
    r.main_grad.push_back(main_grads[l].defined() ? toVector(main_grads[l]) : std::vector<double>(H * E, 0.0));
  }
  return r;
}

double relDiff(const std::vector<double>& a, const std::vector<double>& b) {
  double diff = 0.0, scale = 0.0;
  for (std::size_t i = 0; i < a.size(); ++i) {
    diff = std::max(diff, std::abs(a[i] - b[i]));
    scale = std::max(scale, std::abs(b[i]));
  }
  return scale > 0.0 ? diff / scale : diff;
}

struct Case {
  std::string name;
  std::uint64_t seed;
  int batch, seq_len, hidden, experts, ffn, layers, top_k;
  ScoreFunction score;
  bool norm_topk_prob;
  AuxScope aux_scope;
  double alpha, beta;
  ZLossScope z_scope;
  bool exclude_padding;
  MainLossScope main_scope;
  int dp, microbatches;
  std::vector<int> valid_lengths;
  GroupWeighting weighting = GroupWeighting::kUniform;
};

const ScoreFunction kSoft = ScoreFunction::kSoftmax, kSig = ScoreFunction::kSigmoid;
const AuxScope kMicro = AuxScope::kMicroBatch, kSeq = AuxScope::kSequence, kGlob = AuxScope::kGlobalBatch;
const ZLossScope kZMicro = ZLossScope::kMicroBatch, kZGlob = ZLossScope::kGlobalBatch;
const MainLossScope kTok = MainLossScope::kTokenMean, kMbMean = MainLossScope::kMicrobatchMean;

const std::vector<Case>& cases() {
  static const std::vector<Case> table = {
      // name, seed, B, S, H, E, F, L, k, score, norm, aux scope, alpha, beta, z scope, excl pad, main, dp, M, valid
      {"softmax_1layer_micro", 1, 4, 6, 8, 6, 4, 1, 2, kSoft, false, kMicro, 0.01, 0.0, kZMicro, true, kMbMean, 2, 1, {}},
      {"softmax_norm_2layer_seq_pad", 2, 4, 6, 8, 6, 4, 2, 2, kSoft, true, kSeq, 0.01, 1e-3, kZMicro, true, kTok, 2, 1, {6, 3, 5, 1}},
      {"sigmoid_2layer_global_z", 3, 4, 5, 10, 8, 5, 2, 3, kSig, false, kGlob, 0.02, 1e-3, kZGlob, true, kMbMean, 1, 2, {5, 4, 2, 5}},
      {"sigmoid_norm_3layer_micro", 4, 4, 4, 8, 6, 4, 3, 2, kSig, true, kMicro, 0.01, 1e-2, kZMicro, true, kTok, 2, 2, {4, 1, 3, 4}},
      {"softmax_3layer_count_padding", 5, 2, 6, 6, 5, 3, 3, 1, kSoft, false, kMicro, 0.05, 1e-3, kZGlob, false, kMbMean, 1, 2, {6, 2}},
      {"softmax_k3_seq_empty_sequence", 6, 3, 5, 7, 8, 4, 2, 3, kSoft, false, kSeq, 0.01, 0.0, kZMicro, true, kTok, 1, 1, {5, 0, 3}},
      {"sigmoid_1layer_seq_z_micro", 7, 4, 4, 6, 4, 3, 1, 2, kSig, false, kSeq, 0.01, 5e-3, kZMicro, true, kMbMean, 4, 1, {4, 2, 4, 3}},
      {"softmax_norm_3layer_global_padding_counted", 8, 2, 5, 9, 7, 4, 3, 2, kSoft, true, kGlob, 0.03, 2e-3, kZMicro, false, kTok, 2, 1, {5, 2}},
      // Token-weighted groups (Megatron per-token mode, torchtitan).
      {"softmax_2layer_micro_token_weighted", 9, 4, 6, 8, 6, 4, 2, 2, kSoft, false, kMicro, 0.02, 1e-3, kZMicro, true, kTok, 2, 2, {6, 2, 5, 3}, GroupWeighting::kTokens},
      {"sigmoid_norm_3layer_seq_token_weighted", 10, 3, 5, 7, 6, 4, 3, 2, kSig, true, kSeq, 0.01, 0.0, kZMicro, true, kMbMean, 1, 3, {5, 1, 4}, GroupWeighting::kTokens},
  };
  return table;
}

class ReferenceVsAutograd : public ::testing::TestWithParam<Case> {};

TEST_P(ReferenceVsAutograd, GradientsAndValuesAgree) {
  const Case& c = GetParam();
  const ProblemData d = generateProblem(test::problemScenario(c.seed, c.batch, c.seq_len, c.hidden, c.experts, c.ffn,
                                                              c.layers, c.valid_lengths));
  const ObjectiveDefinition o =
      test::problemObjective({c.score, c.top_k, c.norm_topk_prob, c.aux_scope, c.alpha, c.beta, c.z_scope,
                              c.exclude_padding, c.weighting, c.main_scope, c.dp, c.microbatches});

  ReferenceOptions options;
  options.with_main = true;
  options.directional_checks = 1;
  const ReferenceResult ref = computeReference(d, o, options);
  const AutogradResult ag = autogradObjective(d, o);

  EXPECT_NEAR(ref.aux_value, ag.aux, 1e-13 * std::abs(ag.aux) + 1e-300);
  EXPECT_NEAR(ref.z_value, ag.z, 1e-13 * std::abs(ag.z) + 1e-300);
  EXPECT_NEAR(ref.main_value, ag.main, 1e-13 * std::abs(ag.main));
  const ObjectiveValue value = evaluateObjective(d, o);
  EXPECT_NEAR(value.main, ag.main, 1e-13 * std::abs(ag.main));
  double worst_aux = 0.0, worst_main = 0.0, grad_scale = 0.0, main_scale = 0.0, main_fd_error = 0.0;
  for (int l = 0; l < d.layers; ++l) {
    const double aux_rel = relDiff(ref.layers[l].aux_grad, ag.aux_grad[l]);
    const double main_rel = relDiff(ref.layers[l].main_grad, ag.main_grad[l]);
    EXPECT_LT(aux_rel, 1e-8) << "aux grad, layer " << l;
    EXPECT_LT(main_rel, 1e-8) << "main grad, layer " << l;
    worst_aux = std::max(worst_aux, aux_rel);
    worst_main = std::max(worst_main, main_rel);
    for (double g : ag.aux_grad[l]) grad_scale = std::max(grad_scale, std::abs(g));
    for (double g : ag.main_grad[l]) main_scale = std::max(main_scale, std::abs(g));
    main_fd_error = std::max(main_fd_error, ref.layers[l].main_fd_error);
  }
  // The directional derivative against the autograd gradient.
  double dot = 0.0, norm = 0.0;
  for (int l = 0; l < d.layers; ++l)
    for (std::size_t i = 0; i < ag.aux_grad[l].size(); ++i) {
      dot += ag.aux_grad[l][i] * ref.directional[0].direction[l][i];
      norm += ag.aux_grad[l][i] * ag.aux_grad[l][i];
    }
  EXPECT_NEAR(ref.directional[0].derivative, dot, 1e-8 * std::sqrt(norm));
  RecordProperty("max_rel_aux", std::to_string(worst_aux));
  RecordProperty("max_rel_main", std::to_string(worst_main));
  RecordProperty("fd_error_rel", std::to_string(ref.fd_error_estimate / grad_scale));
  std::printf("[ %s ] aux rel %.2e (fd error estimate %.2e)  main rel %.2e (fd error estimate %.2e)  "
              "near_ties %lld frozen %lld\n",
              c.name.c_str(), worst_aux, ref.fd_error_estimate / grad_scale, worst_main, main_fd_error / main_scale,
              static_cast<long long>(ref.near_ties), static_cast<long long>(ref.frozen_elements));
}

INSTANTIATE_TEST_SUITE_P(Table, ReferenceVsAutograd, ::testing::ValuesIn(cases()),
                         [](const ::testing::TestParamInfo<Case>& info) { return info.param.name; });

}  // namespace
}  // namespace moe
