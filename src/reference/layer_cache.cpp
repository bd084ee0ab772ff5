#include "reference/layer_cache.hpp"

#include <algorithm>
#include <cmath>

#include "reference/parallel.hpp"

namespace moe::reference {

namespace {

// Up to this k, the top-k is found by insertion rather than by partial_sort.
constexpr int kInsertionTopK = 16;

// Top-k order: higher key first, ties -> lower expert index.
inline bool ranksBefore(const double* key, int a, int b) {
  return key[a] > key[b] || (key[a] == key[b] && a < b);
}

// Gate weights of token t for its routing c.topk (DeepSeek-V3 eqs. 13-15): the top-k scores (softmax
// p = exp/sum, sigmoid s), divided by their sum when norm_topk_prob.
void setGates(LayerCache& c, const RouterShape& shape, Index t) {
  const int E = shape.experts, k = shape.top_k;
  const double* score = shape.softmax ? &c.exp_shift[t * E] : &c.sig[t * E];
  double topk_sum = 0.0;
  for (int s = 0; s < k; ++s) topk_sum += score[c.topk[t * k + s]];
  c.topk_sum[t] = topk_sum;
  const double denominator = shape.norm_topk_prob ? topk_sum : (shape.softmax ? c.exp_sum[t] : 1.0);
  for (int s = 0; s < k; ++s) c.gate[t * k + s] = score[c.topk[t * k + s]] / denominator;
}

}  // namespace

void scoreLayer(LayerCache& c, const RouterShape& shape, const std::vector<double>& expert_bias) {
  const Index T = shape.tokens;
  const int E = shape.experts, k = shape.top_k;
  const std::size_t TE = std::size_t(T) * E;
  const bool softmax = shape.softmax;
  c.exp_shift.resize(TE);  // every row written below
  c.exp_sum.assign(T, 0.0);
  c.lse.assign(T, 0.0);
  if (!softmax) {
    c.sig.assign(TE, 0.0);
    c.sig_neg.assign(TE, 0.0);
    c.sig_sum.assign(T, 0.0);
  }
  if (!expert_bias.empty()) c.rank_key.assign(TE, 0.0);
  c.topk.assign(std::size_t(T) * k, 0);
  c.gate.assign(std::size_t(T) * k, 0.0);
  c.topk_sum.assign(T, 0.0);
  parallelFor(T, workerCount(), [&](Index begin, Index end, int) {
    std::vector<int> order(E);
    for (Index t = begin; t < end; ++t) {
      const double* z = &c.logits[t * E];
      double* ex = &c.exp_shift[t * E];
      const double m = *std::max_element(z, z + E);
      double sum = 0.0;
      for (int e = 0; e < E; ++e) sum += (ex[e] = std::exp(z[e] - m));
      c.exp_sum[t] = sum;
      c.lse[t] = m + std::log(sum);
      if (!softmax) {
        double sig_sum = 0.0;
        for (int e = 0; e < E; ++e) {
          // sigma(z) and sigma(-z) from one exponential of -|z| (no overflow, no cancellation).
          const double small = std::exp(-std::abs(z[e]));
          const double big_part = 1.0 / (1.0 + small), small_part = small / (1.0 + small);
          c.sig[t * E + e] = z[e] >= 0.0 ? big_part : small_part;
          c.sig_neg[t * E + e] = z[e] >= 0.0 ? small_part : big_part;
          sig_sum += c.sig[t * E + e];
        }
        c.sig_sum[t] = sig_sum;
      }
      // Routing: top-k of the scores, ties -> lower index. Scores are monotone in the logits
      // (softmax and sigmoid), so without a bias the logits are compared: the same order, without
      // the rounding of the scores. An expert bias (DeepSeek-V3 aux-loss-free balancing) is added to
      // the scores for the choice only.
      const double* key = z;
      if (!expert_bias.empty()) {
        double* rk = &c.rank_key[t * E];
        for (int e = 0; e < E; ++e)
          rk[e] = (softmax ? ex[e] / sum : c.sig[t * E + e]) + expert_bias[e];
        key = rk;
      }
      int* best = &c.topk[t * k];
      if (k <= kInsertionTopK) {
        // Insertion into the sorted best-so-far (O(E k)): the same order as the sort below, since
        // ranksBefore is a strict total order (experts come in index order, so ties stay behind).
        int n = 0;
        for (int e = 0; e < E; ++e) {
          if (n == k && !ranksBefore(key, e, best[k - 1])) continue;
          int pos = n < k ? n++ : k - 1;
          for (; pos > 0 && ranksBefore(key, e, best[pos - 1]); --pos) best[pos] = best[pos - 1];
          best[pos] = e;
        }
      } else {
        for (int e = 0; e < E; ++e) order[e] = e;
        std::partial_sort(order.begin(), order.begin() + k, order.end(),
                          [&](int a, int b) { return ranksBefore(key, a, b); });
        std::copy(order.begin(), order.begin() + k, best);
      }
      setGates(c, shape, t);
    }
  });
}

void forceRouting(LayerCache& c, const RouterShape& shape, const std::vector<std::int64_t>& topk) {
  const int k = shape.top_k;
  for (Index t = 0; t < shape.tokens; ++t) {
    for (int s = 0; s < k; ++s) c.topk[t * k + s] = static_cast<int>(topk[std::size_t(t) * k + s]);
    setGates(c, shape, t);
  }
}

void aggregateAux(LayerCache& c, const RouterShape& shape, const TokenGroups& groups, double alpha) {
  const Index T = shape.tokens;
  const int E = shape.experts, k = shape.top_k;
  const bool softmax = shape.softmax;
  const int G = groups.aux_groups;
  std::vector<double> counts(std::size_t(G) * E, 0.0), prob_sums(std::size_t(G) * E, 0.0);
  for (Index t = 0; t < T; ++t) {
    const int g = groups.aux_group[t];
    if (g < 0) continue;
    for (int s = 0; s < k; ++s) counts[std::size_t(g) * E + c.topk[t * k + s]] += 1.0;
    const double* p = softmax ? &c.exp_shift[t * E] : &c.sig[t * E];
    const double norm = softmax ? c.exp_sum[t] : c.sig_sum[t];
    for (int e = 0; e < E; ++e) prob_sums[std::size_t(g) * E + e] += p[e] / norm;
  }
  c.aux_weight.assign(std::size_t(G) * E, 0.0);
  c.aux_value = 0.0;
  for (int g = 0; g < G; ++g) {
    const double Tg = double(groups.aux_size[g]);
    if (groups.aux_size[g] == 0) continue;
    const double omega = groups.aux_group_weight[g];
    double balance = 0.0;  // sum_e c_e P_e
    for (int e = 0; e < E; ++e) {
      balance += counts[std::size_t(g) * E + e] * (prob_sums[std::size_t(g) * E + e] / Tg);
      c.aux_weight[std::size_t(g) * E + e] = alpha * omega * E * counts[std::size_t(g) * E + e] / (k * Tg * Tg);
    }
    c.aux_value += alpha * omega * (double(E) / (k * Tg)) * balance;
  }
  c.aux_mean.assign(T, 0.0);
  c.z_value = 0.0;
  for (Index t = 0; t < T; ++t) {
    const int g = groups.aux_group[t];
    // z-loss (ST-MoE eq. 5, Megatron z_loss_func): weight_t * (logsumexp_e z_{t,e})^2.
    c.z_value += groups.z_weight[t] * c.lse[t] * c.lse[t];
    if (g < 0) continue;
    const double* w = &c.aux_weight[std::size_t(g) * E];
    const double* p = softmax ? &c.exp_shift[t * E] : &c.sig[t * E];
    const double norm = softmax ? c.exp_sum[t] : c.sig_sum[t];
    c.aux_mean[t] = dot(w, p, E) / norm;
  }
}

TokenRow tokenRow(const LayerCache& c, const RouterShape& shape, const TokenGroups& groups, Index t) {
  const int E = shape.experts, k = shape.top_k;
  TokenRow r;
  r.t = t;
  r.z = &c.logits[t * E];
  r.rank = c.rank_key.empty() ? r.z : &c.rank_key[t * E];
  r.ex = &c.exp_shift[t * E];
  if (!shape.softmax) {
    r.sig = &c.sig[t * E];
    r.sig_neg = &c.sig_neg[t * E];
    r.sig_sum = c.sig_sum[t];
  }
  const int g = groups.aux_group[t];
  if (g >= 0) {
    r.w = &c.aux_weight[std::size_t(g) * E];
    r.a = c.aux_mean[t];
  }
  r.zw = groups.z_weight[t];
  r.gate = &c.gate[t * k];
  r.topk = &c.topk[t * k];
  r.S = c.exp_sum[t];
  r.lse = c.lse[t];
  r.topk_sum = c.topk_sum[t];
  return r;
}

}  // namespace moe::reference
