#include "reference/forward_cache.hpp"

#include <cblas.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>

#include "common/errors.hpp"
#include "reference/parallel.hpp"

namespace moe::reference {
namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();

void checkProblem(const ProblemData& data, const ObjectiveDefinition& objective) {
  auto fail = [](const std::string& what) { throw InputError("", "/data", what); };
  if (data.batch <= 0 || data.seq_len <= 0 || data.hidden <= 0 || data.experts <= 0 || data.layers <= 0)
    fail("positive batch, seq_len, hidden, experts and layers");
  const Index T = data.tokens();
  const std::size_t H = data.hidden, E = data.experts, L = data.layers;
  if (objective.top_k < 1 || objective.top_k > data.experts)
    throw InputError("", "/model/top_k", "1 <= top_k <= experts");
  if (data.x.size() != T * H || data.y.size() != T * H || data.valid.size() != std::size_t(T))
    fail("x and y of B*S*H values and valid of B*S values");
  if (data.router_weight.size() != L || data.expert_in.size() != L || data.expert_out.size() != L)
    fail("router and expert weights for every layer");
  for (std::size_t l = 0; l < L; ++l)
    if (data.router_weight[l].size() != H * E) fail("router weight [H, E] of layer " + std::to_string(l));
}

// Would token t's top-k differ under z + dz? (weakest routed vs best unrouted, ties -> lower index)
bool routingChanges(const double* z, const double* dz, const int* topk, int k, int E, Scratch& scratch) {
  if (k == E) return false;
  for (int s = 0; s < k; ++s) scratch.marked[topk[s]] = 1;
  int weakest = topk[0];
  double weakest_value = z[weakest] + dz[weakest];
  for (int s = 1; s < k; ++s) {
    const int e = topk[s];
    const double v = z[e] + dz[e];
    if (v < weakest_value || (v == weakest_value && e > weakest)) weakest = e, weakest_value = v;
  }
  int best = -1;
  double best_value = -kInf;
  for (int e = 0; e < E; ++e) {
    if (scratch.marked[e]) continue;
    const double v = z[e] + dz[e];
    if (best < 0 || v > best_value) best = e, best_value = v;
  }
  for (int s = 0; s < k; ++s) scratch.marked[topk[s]] = 0;
  return best_value > weakest_value || (best_value == weakest_value && best < weakest);
}

}  // namespace

ForwardCache::ForwardCache(const ProblemData& data, const ObjectiveDefinition& objective, bool with_main,
                           bool last_layer_experts)
    : data_(data), obj_(objective), with_main_(with_main), last_layer_experts_(last_layer_experts) {
  checkProblem(data, objective);
  T_ = data.tokens();
  H_ = data.hidden;
  E_ = data.experts;
  F_ = data.ffn;
  L_ = data.layers;
  k_ = objective.top_k;
  shape_ = RouterShape{T_, E_, k_, objective.score == ScoreFunction::kSoftmax, objective.norm_topk_prob};
  groups_ = weighGroups(assignGroups(data, objective), objective);
  has_aux_terms_ = objective.aux_coeff != 0.0 || objective.z_coeff != 0.0;
}

void ForwardCache::forward() {
  layers_.assign(L_, LayerCache{});
  for (int l = 0; l < L_; ++l) {
    const bool experts = l < L_ - 1 || last_layer_experts_;
    if (experts && (data_.expert_in[l].size() != std::size_t(E_) * H_ * F_ ||
                    data_.expert_out[l].size() != std::size_t(E_) * F_ * H_)) {
      throw InputError("", "/data", "expert weights [E, H, F] and [E, F, H] of layer " + std::to_string(l));
    }
    forwardLayer(l, experts);
  }
  if (with_main_) {
    // Main loss: sum over valid tokens of weight_t * 0.5 ||h_L - y||^2.
    residual_.assign(std::size_t(T_) * H_, 0.0);
    main_value_ = 0.0;
    for (Index t = 0; t < T_; ++t) {
      double sq = 0.0;
      for (int i = 0; i < H_; ++i) {
        const double r = final_hidden_[t * H_ + i] - data_.y[t * H_ + i];
        residual_[t * H_ + i] = r;
        sq += r * r;
      }
      main_value_ += groups_.main_weight[t] * 0.5 * sq;
    }
  }
}

void ForwardCache::forwardLayer(int l, bool experts) {
  LayerCache& c = layers_[l];
  const double* h = hidden(l);
  const std::size_t TE = std::size_t(T_) * E_;
  const double* W = data_.router_weight[l].data();
  // z = h W [T, E], the first of the two products per layer.
  c.logits.assign(TE, 0.0);
  cblas_dgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, int(T_), E_, H_, 1.0, h, H_, W, E_, 0.0,
              c.logits.data(), E_);
  scoreLayer(c, shape_, {});
  aggregateAux(c, shape_, groups_, obj_.aux_coeff);

  // Experts: h_{l+1} = h_l + sum_{e in topk} g_e tanh(h_l A_e) B_e.
  c.has_experts = experts;
  if (!experts) return;
  const int k = k_, F = F_, H = H_;
  c.act.assign(std::size_t(T_) * k * F, 0.0);
  c.sech2.assign(std::size_t(T_) * k * F, 0.0);
  c.out.assign(std::size_t(T_) * k * H, 0.0);
  std::vector<double>& next = l + 1 < L_ ? layers_[l + 1].hidden : final_hidden_;
  next.assign(h, h + std::size_t(T_) * H);
  parallelFor(T_, workerCount(), [&](Index begin, Index end, int) {
    std::vector<double> pre(std::max(F, 1));
    for (Index t = begin; t < end; ++t) {
      const double* ht = h + t * H;
      for (int s = 0; s < k; ++s) {
        const int e = c.topk[t * k + s];
        const double* A = &data_.expert_in[l][std::size_t(e) * H * F];
        const double* Bm = &data_.expert_out[l][std::size_t(e) * F * H];
        double* act = &c.act[(std::size_t(t) * k + s) * F];
        double* sech2 = &c.sech2[(std::size_t(t) * k + s) * F];
        double* out = &c.out[(std::size_t(t) * k + s) * H];
        std::fill(pre.begin(), pre.end(), 0.0);
        for (int i = 0; i < H; ++i) {
          const double hi = ht[i];
          const double* row = A + std::size_t(i) * F;
          for (int f = 0; f < F; ++f) pre[f] += hi * row[f];
        }
        for (int f = 0; f < F; ++f) {
          act[f] = std::tanh(pre[f]);
          const double ch = std::cosh(pre[f]);
          sech2[f] = 1.0 / (ch * ch);
        }
        for (int f = 0; f < F; ++f) {
          const double a = act[f];
          const double* row = Bm + std::size_t(f) * H;
          for (int i = 0; i < H; ++i) out[i] += a * row[i];
        }
        const double g = c.gate[t * k + s];
        double* nt = &next[std::size_t(t) * H];
        for (int i = 0; i < H; ++i) nt[i] += g * out[i];
      }
    }
  });
}

void ForwardCache::stepLayer(int l, Index t, const double* given_expm1, bool dh_zero, bool later, Delta& delta,
                             bool check_routing, Scratch& scratch) const {
  const LayerCache& c = layers_[l];
  const double* dh = scratch.dh.data();
  const double* dz = scratch.dz.data();
  double* em = scratch.em.data();
  double* ds = scratch.ds.data();
  const bool softmax = shape_.softmax;
  const double* z = &c.logits[t * E_];
  const double* ex = &c.exp_shift[t * E_];
  const double S = c.exp_sum[t];
  // em_e = exp(z + dz - m) - exp(z - m) = exp(z - m) expm1(dz); sigmoid: ds_e = sigma(z + dz) -
  // sigma(z) from expm1(-dz) = -expm1(dz) / (1 + expm1(dz)).
  double dS = 0.0, dSs = 0.0;
  for (int e = 0; e < E_; ++e) {
    const double raw = given_expm1 ? given_expm1[e] : std::expm1(dz[e]);
    em[e] = ex[e] * raw;
    dS += em[e];
    if (!softmax) {
      ds[e] = sigmoidDelta(c.sig[t * E_ + e], c.sig_neg[t * E_ + e], -raw / (1.0 + raw));
      dSs += ds[e];
    }
  }
  if (auxToken(t)) {
    const double* w = &c.aux_weight[std::size_t(groups_.aux_group[t]) * E_];
    const double a = c.aux_mean[t];
    // a' - a = sum_e (w_e - a) dnum_e / (S + dS) for a = sum_e w_e num_e / S.
    double acc = 0.0;
    if (softmax) {
      for (int e = 0; e < E_; ++e) acc += (w[e] - a) * em[e];
      delta.aux += acc / (S + dS);
    } else {
      for (int e = 0; e < E_; ++e) acc += (w[e] - a) * ds[e];
      delta.aux += acc / (c.sig_sum[t] + dSs);
    }
    const double zw = groups_.z_weight[t];
    if (zw != 0.0) {
      const double dl = std::log1p(dS / S);
      delta.aux += zw * dl * (2.0 * c.lse[t] + dl);
    }
  }
  const int* topk = &c.topk[t * k_];
  if (check_routing && routingChanges(z, dz, topk, k_, E_, scratch)) delta.routing_changed = true;
  if (!later) return;
  // Gate changes of the frozen routing.
  double* dnum = scratch.dnum.data();
  for (int s = 0; s < k_; ++s) dnum[s] = softmax ? em[topk[s]] : ds[topk[s]];
  double* dg = scratch.dg.data();
  gateChange(tokenRow(c, shape_, groups_, t), k_, softmax, shape_.norm_topk_prob, dnum, dS, dg);
  // dh_{l+1} = dh + sum_s [(g + dg) (o + do) - g o] = dh + sum_s [dg o + (g + dg) do], with
  // do = (tanh(x + dx) - tanh(x)) B with x = h A_e, dx = dh A_e, and
  // tanh(x + dx) - tanh(x) = tanh(dx) sech^2(x) / (1 + tanh(x) tanh(dx)) (addition theorem).
  const double* gate = &c.gate[t * k_];
  double* next = scratch.dh_next.data();
  if (dh_zero) std::fill(next, next + H_, 0.0);
  else std::copy(dh, dh + H_, next);
  for (int s = 0; s < k_; ++s) {
    const double* out = &c.out[(std::size_t(t) * k_ + s) * H_];
    for (int i = 0; i < H_; ++i) next[i] += dg[s] * out[i];
    if (dh_zero) continue;
    const int e = topk[s];
    const double* A = &data_.expert_in[l][std::size_t(e) * H_ * F_];
    const double* Bm = &data_.expert_out[l][std::size_t(e) * F_ * H_];
    const double* act = &c.act[(std::size_t(t) * k_ + s) * F_];
    const double* sech2 = &c.sech2[(std::size_t(t) * k_ + s) * F_];
    double* dpre = scratch.dpre.data();
    double* du = scratch.du.data();
    std::fill(dpre, dpre + F_, 0.0);
    for (int i = 0; i < H_; ++i) {
      const double dhi = dh[i];
      if (dhi == 0.0) continue;
      const double* row = A + std::size_t(i) * F_;
      for (int f = 0; f < F_; ++f) dpre[f] += dhi * row[f];
    }
    for (int f = 0; f < F_; ++f) {
      const double tanh_dx = std::tanh(dpre[f]);
      du[f] = tanh_dx * sech2[f] / (1.0 + act[f] * tanh_dx);
    }
    const double weight = gate[s] + dg[s];
    for (int f = 0; f < F_; ++f) {
      const double a = weight * du[f];
      const double* row = Bm + std::size_t(f) * H_;
      for (int i = 0; i < H_; ++i) next[i] += a * row[i];
    }
  }
}

Delta ForwardCache::propagateHiddenChange(int l0, Index t, bool include_main, Scratch& scratch) const {
  Delta delta;
  const bool aux_token = auxToken(t);
  for (int l = l0; l < L_; ++l) {
    const bool later = l < L_ - 1 || include_main;
    if (!aux_token && !later) break;
    // dz = dh W_l.
    double* dz = scratch.dz.data();
    std::fill(dz, dz + E_, 0.0);
    const double* W = data_.router_weight[l].data();
    const double* dh = scratch.dh.data();
    for (int i = 0; i < H_; ++i) {
      const double dhi = dh[i];
      if (dhi == 0.0) continue;
      const double* row = W + std::size_t(i) * E_;
      for (int e = 0; e < E_; ++e) dz[e] += dhi * row[e];
    }
    stepLayer(l, t, nullptr, /*dh_zero=*/false, later, delta, /*check_routing=*/true, scratch);
    if (!later) break;
    std::swap(scratch.dh, scratch.dh_next);  // scratch.dh: the change entering the next layer
  }
  if (include_main && groups_.main_weight[t] != 0.0) {
    // 0.5||r + dh||^2 - 0.5||r||^2 = dh.r + 0.5||dh||^2.
    const double* dh = scratch.dh.data();
    const double* r = &residual_[std::size_t(t) * H_];
    delta.main = groups_.main_weight[t] * (dot(dh, r, H_) + 0.5 * dot(dh, dh, H_));
  }
  return delta;
}

double ForwardCache::propagateDirection(Index t, const std::vector<RankOneDirection>& direction, double eps,
                                        const double* em_first, Scratch& scratch) const {
  Delta delta;
  bool dh_zero = true;
  for (int l = 0; l < L_; ++l) {
    const bool later = l < L_ - 1;
    if (!auxToken(t) && !later) break;
    const double* given = l == 0 ? em_first : nullptr;
    if (given == nullptr) {
      // dz = dh W_l + eps * V_l applied to the perturbed hidden state.
      double* dz = scratch.dz.data();
      std::fill(dz, dz + E_, 0.0);
      const double* dh = scratch.dh.data();
      if (!dh_zero) {
        const double* W = data_.router_weight[l].data();
        for (int i = 0; i < H_; ++i) {
          const double dhi = dh[i];
          if (dhi == 0.0) continue;
          const double* row = W + std::size_t(i) * E_;
          for (int e = 0; e < E_; ++e) dz[e] += dhi * row[e];
        }
      }
      const RankOneDirection& v = direction[l];
      const double hu = v.hidden_dot_u[t] + (dh_zero ? 0.0 : dot(dh, v.u.data(), H_));
      const double scale = eps * v.scale * hu;
      for (int e = 0; e < E_; ++e) dz[e] += scale * v.v[e];
    }
    stepLayer(l, t, given, dh_zero, later, delta, /*check_routing=*/false, scratch);
    if (!later) break;
    std::swap(scratch.dh, scratch.dh_next);
    dh_zero = false;
  }
  return delta.aux;
}

}  // namespace moe::reference
