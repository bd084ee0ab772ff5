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
  keepExpertOutputsUpTo(256.0 * (1 << 20));
}

void ForwardCache::keepExpertOutputsUpTo(double bytes) {
  keep_outputs_ = expertOutputsFit(double(T_), k_, H_, L_, bytes);
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
    // h_L becomes h_L - y in place (h_L itself is not needed after this).
    residual_ = std::move(final_hidden_);
    main_value_ = 0.0;
    for (Index t = 0; t < T_; ++t) {
      double sq = 0.0;
      for (int i = 0; i < H_; ++i) {
        const double r = residual_[t * H_ + i] - data_.y[t * H_ + i];
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
  c.logits.resize(TE);  // written in full by the dgemm
  const SingleThreadedBlas small(double(T_) * H_ * E_ < kSmallBlasWork);
  cblas_dgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, int(T_), E_, H_, 1.0, h, H_, W, E_, 0.0,
              c.logits.data(), E_);
  scoreLayer(c, shape_, {});
  aggregateAux(c, shape_, groups_, obj_.aux_coeff);

  // Experts: h_{l+1} = h_l + sum_{e in topk} g_e tanh(h_l A_e) B_e.
  c.has_experts = experts;
  if (!experts) return;
  const int k = k_, F = F_, H = H_;
  c.act.resize(std::size_t(T_) * k * F);  // every slot is written by its expert below
  // sech^2 enters only where a layer's input changes (stepLayer with dh != 0, the suffix basis of the
  // last layer): never for layer 0, whose input x is fixed.
  const bool with_sech2 = l > 0;
  if (with_sech2) c.sech2.resize(std::size_t(T_) * k * F);
  FilledLater& next = l + 1 < L_ ? layers_[l + 1].hidden : final_hidden_;
  // Grouped by expert: each expert's routed rows as one [n_e, H] block, two dgemms (pre-activation
  // x = h A_e, output tanh(x) B_e) instead of a matrix-vector product per (token, slot). The
  // [T, k, H] outputs are kept only while small (keep_outputs_; at DeepSeek-V3 size they would be
  // 1.9 GB per layer): then every expert is computed in one parallel pass straight into c.out;
  // otherwise `workers` experts at a time into per-worker buffers, and rows are recomputed per token
  // from act where needed (expertOutput). Either way each token's slots are added into h_{l+1} in
  // expert order, so h_{l+1} does not depend on the thread count or on which path ran.
  // slots[first_row[e] .. first_row[e + 1]): the slots t k + s routed to expert e, in token order.
  std::vector<Index> first_row(E_ + 1, 0), slots(std::size_t(T_) * k);
  for (Index at = 0; at < T_ * k; ++at) ++first_row[c.topk[at] + 1];
  for (int e = 0; e < E_; ++e) first_row[e + 1] += first_row[e];
  {
    std::vector<Index> cursor(first_row.begin(), first_row.end() - 1);
    for (Index at = 0; at < T_ * k; ++at) slots[cursor[c.topk[at]]++] = at;
  }
  const int workers = workerCount();
  // Each worker gathers an expert's rows into its own buffers, sized once for the largest expert and
  // not zero-filled (instead of growing and zero-filling them expert by expert).
  Index largest = 0;
  for (int e = 0; e < E_; ++e) largest = std::max(largest, first_row[e + 1] - first_row[e]);
  struct ExpertScratch {
    FilledLater rows, pre;  // [n_e, H] gathered inputs, [n_e, F] pre-activations then activations
  };
  std::vector<ExpertScratch> scratch(workers);
  // Expert e's routed rows: activations (and sech^2) into the cache, outputs [n_e, H] into `out`.
  const auto runExpert = [&](int e, int worker, double* out) {
    ExpertScratch& buffers = scratch[worker];
    if (buffers.rows.empty()) {
      buffers.rows.resize(std::size_t(largest) * H);
      buffers.pre.resize(std::size_t(largest) * F);
    }
    FilledLater& rows = buffers.rows;
    FilledLater& pre = buffers.pre;
    const Index* pairs = &slots[first_row[e]];
    const int n = static_cast<int>(first_row[e + 1] - first_row[e]);
    for (int i = 0; i < n; ++i) {
      const double* ht = h + (pairs[i] / k) * H;
      std::copy(ht, ht + H, rows.begin() + std::size_t(i) * H);
    }
    cblas_dgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, n, F, H, 1.0, rows.data(), H,
                &data_.expert_in[l][std::size_t(e) * H * F], F, 0.0, pre.data(), F);
    for (int i = 0; i < n; ++i)
      for (int f = 0; f < F; ++f) {
        double& x = pre[std::size_t(i) * F + f];
        if (with_sech2) {
          const double ch = std::cosh(x);
          c.sech2[std::size_t(pairs[i]) * F + f] = 1.0 / (ch * ch);
        }
        x = std::tanh(x);
        c.act[std::size_t(pairs[i]) * F + f] = x;
      }
    cblas_dgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, n, H, F, 1.0, pre.data(), F,
                &data_.expert_out[l][std::size_t(e) * F * H], H, 0.0, out, H);
  };
  if (keep_outputs_) {
    // c.out grouped by expert: expert e's rows start at row first_row[e]; each dgemm writes its block
    // in place. Then h_{l+1} = h_l + sum_s g_s out[t, s] per token, its slots in expert order.
    c.out.resize(std::size_t(T_) * k * H);
    c.out_row.resize(std::size_t(T_) * k);
    for (Index row = 0; row < T_ * k; ++row) c.out_row[slots[row]] = row;
    parallelFor(E_, workers, [&](Index begin, Index end, int worker) {
      for (Index e = begin; e < end; ++e)
        if (first_row[e + 1] > first_row[e])
          runExpert(static_cast<int>(e), worker, &c.out[std::size_t(first_row[e]) * H]);
    });
    next.resize(std::size_t(T_) * H);
    parallelFor(T_, workers, [&](Index begin, Index end, int) {
      std::vector<int> order(k);
      for (Index t = begin; t < end; ++t) {
        for (int s = 0; s < k; ++s) order[s] = s;
        std::sort(order.begin(), order.end(), [&](int a, int b) { return c.topk[t * k + a] < c.topk[t * k + b]; });
        double* nt = &next[std::size_t(t) * H];
        std::copy(h + std::size_t(t) * H, h + std::size_t(t + 1) * H, nt);
        for (int s : order) {
          const double g = c.gate[t * k + s];
          const double* row = &c.out[std::size_t(c.out_row[t * k + s]) * H];
          for (int j = 0; j < H; ++j) nt[j] += g * row[j];
        }
      }
    });
    return;
  }
  next.assign(h, h + std::size_t(T_) * H);
  std::vector<std::vector<double>> outputs(workers);
  for (int first = 0; first < E_; first += workers) {
    const int batch = std::min(workers, E_ - first);
    parallelFor(batch, workers, [&](Index b_begin, Index b_end, int worker) {
      for (Index b = b_begin; b < b_end; ++b) {
        const int e = first + static_cast<int>(b);
        if (first_row[e + 1] == first_row[e]) continue;
        outputs[b].resize(std::size_t(first_row[e + 1] - first_row[e]) * H);
        runExpert(e, worker, outputs[b].data());
      }
    });
    // h_{l+1}[t] += g_s out[t, s] for the batch's experts, in expert order.
    for (int b = 0; b < batch; ++b) {
      const int e = first + b;
      for (Index row = first_row[e]; row < first_row[e + 1]; ++row) {
        const Index at = slots[row];
        const double g = c.gate[at];
        const double* out = &outputs[b][std::size_t(row - first_row[e]) * H];
        double* nt = &next[std::size_t(at / k) * H];
        for (int j = 0; j < H; ++j) nt[j] += g * out[j];
      }
    }
  }
}

const double* ForwardCache::expertOutput(int l, Index t, int s, double* row) const {
  const LayerCache& c = layers_[l];
  if (!c.out.empty()) return &c.out[std::size_t(c.out_row[std::size_t(t) * k_ + s]) * H_];
  const int e = c.topk[t * k_ + s];
  const double* act = &c.act[(std::size_t(t) * k_ + s) * F_];
  const double* Bm = &data_.expert_out[l][std::size_t(e) * F_ * H_];
  std::fill(row, row + H_, 0.0);
  for (int f = 0; f < F_; ++f) {
    const double a = act[f];
    const double* b = Bm + std::size_t(f) * H_;
    for (int i = 0; i < H_; ++i) row[i] += a * b[i];
  }
  return row;
}

double ForwardCache::stepLogits(int l, Index t, const double* given_expm1, Delta& delta, bool check_routing,
                               bool gates, Scratch& scratch) const {
  const LayerCache& c = layers_[l];
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
    const double raw = given_expm1 ? given_expm1[e] : expm1Small(dz[e]);
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
  if (gates) {
    // Gate changes of the frozen routing.
    double* dnum = scratch.dnum.data();
    for (int s = 0; s < k_; ++s) dnum[s] = softmax ? em[topk[s]] : ds[topk[s]];
    gateChange(tokenRow(c, shape_, groups_, t), k_, softmax, shape_.norm_topk_prob, dnum, dS, scratch.dg.data());
  }
  return dS;
}

void ForwardCache::stepLayer(int l, Index t, const double* given_expm1, bool dh_zero, bool later, Delta& delta,
                             bool check_routing, Scratch& scratch, bool form_next) const {
  stepLogits(l, t, given_expm1, delta, check_routing, /*gates=*/later, scratch);
  if (!later || !form_next) return;
  const LayerCache& c = layers_[l];
  const double* dh = scratch.dh.data();
  const int* topk = &c.topk[t * k_];
  const double* dg = scratch.dg.data();
  // dh_{l+1} = dh + sum_s [(g + dg) (o + do) - g o] = dh + sum_s [dg o + (g + dg) do], with
  // do = (tanh(x + dx) - tanh(x)) B with x = h A_e, dx = dh A_e, and
  // tanh(x + dx) - tanh(x) = tanh(dx) sech^2(x) / (1 + tanh(x) tanh(dx)) (addition theorem).
  const double* gate = &c.gate[t * k_];
  double* next = scratch.dh_next.data();
  if (dh_zero) std::fill(next, next + H_, 0.0);
  else std::copy(dh, dh + H_, next);
  for (int s = 0; s < k_; ++s) {
    const double* out = expertOutput(l, t, s, scratch.out_row.data());
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

Delta ForwardCache::propagateHiddenChange(int l0, Index t, bool include_main, Scratch& scratch,
                                          bool dz_given) const {
  Delta delta;
  const bool aux_token = auxToken(t);
  for (int l = l0; l < L_; ++l) {
    const bool later = l < L_ - 1 || include_main;
    if (!aux_token && !later) break;
    // dz = dh W_l.
    double* dz = scratch.dz.data();
    if (!(dz_given && l == l0)) {
      std::fill(dz, dz + E_, 0.0);
      const double* W = data_.router_weight[l].data();
      const double* dh = scratch.dh.data();
      for (int i = 0; i < H_; ++i) {
        const double dhi = dh[i];
        if (dhi == 0.0) continue;
        const double* row = W + std::size_t(i) * E_;
        for (int e = 0; e < E_; ++e) dz[e] += dhi * row[e];
      }
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
  const bool layer1_from_products =
      L_ >= 2 && nextLogitProducts(0, t) != nullptr && !direction[1].prev_out_dot_u.empty();
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
      const RankOneDirection& v = direction[l];
      double hu = v.hidden_dot_u[t];
      if (l == 1 && layer1_from_products) {
        // Layer 0 moved h_1 by sum_s dg_s out_0[t, s] (stepLayer with dh_zero), so
        // dh W_1 = sum_s dg_s (out_0[t, s] W_1) and dh . u = sum_s dg_s (out_0[t, s] . u).
        const double* P = nextLogitProducts(0, t);
        const double* dg = scratch.dg.data();
        for (int s = 0; s < k_; ++s) {
          const double* row = P + std::size_t(s) * E_;
          for (int e = 0; e < E_; ++e) dz[e] += dg[s] * row[e];
          hu += dg[s] * v.prev_out_dot_u[std::size_t(t) * k_ + s];
        }
      } else if (!dh_zero) {
        const double* W = data_.router_weight[l].data();
        for (int i = 0; i < H_; ++i) {
          const double dhi = dh[i];
          if (dhi == 0.0) continue;
          const double* row = W + std::size_t(i) * E_;
          for (int e = 0; e < E_; ++e) dz[e] += dhi * row[e];
        }
        hu += dot(dh, v.u.data(), H_);
      }
      const double scale = eps * v.scale * hu;
      for (int e = 0; e < E_; ++e) dz[e] += scale * v.v[e];
    }
    // With two layers and layer 1 taken from the products, h_1's change itself is never needed.
    const bool form_next = !(l == 0 && L_ == 2 && layer1_from_products);
    stepLayer(l, t, given, dh_zero, later, delta, /*check_routing=*/false, scratch, form_next);
    if (!later) break;
    std::swap(scratch.dh, scratch.dh_next);
    dh_zero = false;
  }
  return delta.aux;
}

void ForwardCache::prepareSuffixProducts() {
  // out_l[t, s] W_{l+1} = act[t, s] (B_e W_{l+1}): one [F, E] product per expert (dgemm), then F
  // multiply-adds per logit instead of H.
  next_logits_of_out_.assign(std::max(L_ - 1, 0), {});
  for (int l = 0; l + 1 < L_; ++l) {
    const LayerCache& c = layers_[l];
    if (!c.has_experts) continue;
    std::vector<double> BW(std::size_t(E_) * F_ * E_);
    parallelFor(E_, workerCount(), [&](Index begin, Index end, int) {
      for (Index e = begin; e < end; ++e)
        cblas_dgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, F_, E_, H_, 1.0,
                    &data_.expert_out[l][std::size_t(e) * F_ * H_], H_, data_.router_weight[l + 1].data(), E_, 0.0,
                    &BW[std::size_t(e) * F_ * E_], E_);
    });
    std::vector<double>& P = next_logits_of_out_[l];
    P.assign(std::size_t(T_) * k_ * E_, 0.0);
    parallelFor(T_, workerCount(), [&](Index begin, Index end, int) {
      for (Index t = begin; t < end; ++t)
        for (int s = 0; s < k_; ++s) {
          const std::size_t at = std::size_t(t) * k_ + s;
          const double* act = &c.act[at * F_];
          const double* bw = &BW[std::size_t(c.topk[at]) * F_ * E_];
          double* p = &P[at * E_];
          for (int f = 0; f < F_; ++f)
            for (int e = 0; e < E_; ++e) p[e] += act[f] * bw[std::size_t(f) * E_ + e];
        }
    });
  }
}

const double* ForwardCache::nextLogitProducts(int l, Index t) const {
  if (l >= static_cast<int>(next_logits_of_out_.size()) || next_logits_of_out_[l].empty()) return nullptr;
  return &next_logits_of_out_[l][std::size_t(t) * k_ * E_];
}

std::vector<double> ForwardCache::firstOutputsDot(const double* u) const {
  // out_0[t, s] . u = act[t, s] . (B_e u).
  std::vector<double> out(std::size_t(T_) * k_, 0.0);
  if (L_ < 2 || !layers_[0].has_experts) return out;
  const LayerCache& c = layers_[0];
  std::vector<double> Bu(std::size_t(E_) * F_);
  cblas_dgemv(CblasRowMajor, CblasNoTrans, E_ * F_, H_, 1.0, data_.expert_out[0].data(), H_, u, 1, 0.0, Bu.data(), 1);
  for (Index t = 0; t < T_; ++t)
    for (int s = 0; s < k_; ++s) {
      const std::size_t at = std::size_t(t) * k_ + s;
      out[at] = dot(&c.act[at * F_], &Bu[std::size_t(c.topk[at]) * F_], F_);
    }
  return out;
}

bool ForwardCache::suffixBasisPaysOff() const {
  // Per token: the basis costs m^2 H / 2 (dsyrk) + k^2 H F (the Q products) in BLAS; the general
  // path costs 6 k evaluations x k experts x 2 H F multiply-adds in scalar loops that stream the
  // experts' weights. The factor 4 is the measured speed of the former over the latter
  // (bench/RESULTS.md, issue 11).
  const double m = 2.0 * k_ + double(k_) * F_;
  const double basis = m * m / 2.0 + double(k_) * k_ * F_;
  const double general = 12.0 * k_ * k_ * F_;
  return with_main_ && L_ >= 2 && layers_[L_ - 1].has_experts && basis <= 4.0 * general;
}

void ForwardCache::buildSuffixBasis(int l, Index t, TokenSuffixBasis& b) const {
  const int k = k_, F = F_, H = H_;
  const int m = 2 * k + k * F;
  b.m = m;
  b.V.resize(std::size_t(m) * H);
  b.G.resize(std::size_t(m) * m);
  b.Vr.resize(m);
  b.Q.resize(std::size_t(k) * k * std::max(F, 1));
  const LayerCache& last = layers_[l + 1];
  const double* out_below = b.V.data();  // rows [0, k)
  for (int s = 0; s < k; ++s) {
    for (int which = 0; which < 2; ++which) {
      double* row = &b.V[std::size_t(which * k + s) * H];
      const double* out = expertOutput(l + which, t, s, row);
      if (out != row) std::copy(out, out + H, row);
    }
  }
  for (int s = 0; s < k; ++s) {
    const int e = last.topk[t * k + s];
    const double* Bm = &data_.expert_out[l + 1][std::size_t(e) * F * H];
    std::copy(Bm, Bm + std::size_t(F) * H, b.V.begin() + (std::size_t(2 * k) + std::size_t(s) * F) * H);
    // Q[s0][s][f] = out_l[t, s0] . A_e[:, f] for the last layer's slot s (expert e).
    if (F > 0)
      cblas_dgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, k, F, H, 1.0, out_below, H,
                  &data_.expert_in[l + 1][std::size_t(e) * H * F], F, 0.0, &b.Q[std::size_t(s) * F], k * F);
  }
  cblas_dsyrk(CblasRowMajor, CblasUpper, CblasNoTrans, m, H, 1.0, b.V.data(), H, 0.0, b.G.data(), m);
  for (int i = 0; i < m; ++i)
    for (int j = 0; j < i; ++j) b.G[std::size_t(i) * m + j] = b.G[std::size_t(j) * m + i];
  cblas_dgemv(CblasRowMajor, CblasNoTrans, m, H, 1.0, b.V.data(), H, &residual_[std::size_t(t) * H], 1, 0.0,
              b.Vr.data(), 1);
}

const double* ForwardCache::gateOutput(int l, Index t, int s, Scratch& scratch) const {
  // The six evaluations of one (t, s) (three steps, two signs) come in a row: find its row once.
  Scratch::Gate& g = scratch.gate;
  if (g.layer != l || g.token != t || g.slot != s) {
    g.layer = l;
    g.token = t;
    g.slot = s;
    g.row = expertOutput(l, t, s, scratch.gate_row.data());
    g.has_dots = false;
  }
  return g.row;
}

Delta ForwardCache::gateSuffixChange(int l, Index t, int s, double delta, bool include_main,
                                     const TokenSuffixBasis* basis, Scratch& scratch) const {
  if (l + 1 >= L_) {
    // The last layer's gate: only the main loss follows, w (delta o.r + 0.5 delta^2 o.o) with o.r and
    // o.o taken once per (t, s).
    Delta result;
    if (include_main && groups_.main_weight[t] != 0.0) {
      const double* out = gateOutput(l, t, s, scratch);
      Scratch::Gate& g = scratch.gate;
      if (!g.has_dots) {
        g.dot_r = dotInterleaved(out, &residual_[std::size_t(t) * H_], H_);
        g.sq = dotInterleaved(out, out, H_);
        g.has_dots = true;
      }
      result.main = groups_.main_weight[t] * (delta * g.dot_r + 0.5 * delta * delta * g.sq);
    }
    return result;
  }
  // Layer l+1's logits move by delta (out_l[t, s] W_{l+1}), from the products when they are there.
  const double* P = nextLogitProducts(l, t);
  const bool dz_given = P != nullptr;
  if (dz_given) {
    const double* row = P + std::size_t(s) * E_;
    double* dz = scratch.dz.data();
    for (int e = 0; e < E_; ++e) dz[e] = delta * row[e];
  }
  if (basis == nullptr || !include_main || l + 2 != L_) {
    const double* out = gateOutput(l, t, s, scratch);
    for (int i = 0; i < H_; ++i) scratch.dh[i] = delta * out[i];
    return propagateHiddenChange(l + 1, t, include_main, scratch, dz_given);
  }
  // l+1 is the last layer and the main loss follows: stepLayer's expert half and the main loss on
  // the basis. dh_L = delta out_s + sum_s' [dg_s' o_s' + (g_s' + dg_s') du_s' B_e'], du from the
  // addition theorem as in stepLayer, with the expert input change dx = delta Q[s][s'].
  Delta result;
  const int l1 = l + 1, k = k_, F = F_, m = basis->m;
  stepLogits(l1, t, nullptr, result, /*check_routing=*/true, /*gates=*/true, scratch);
  const LayerCache& last = layers_[l1];
  const double* gate = &last.gate[t * k];
  const double* dg = scratch.dg.data();
  // Coefficients a of dh_L on the rows of V.
  double* a = scratch.basis_coeff.data();
  std::fill(a, a + m, 0.0);
  a[s] = delta;
  for (int s1 = 0; s1 < k; ++s1) {
    a[k + s1] = dg[s1];
    const double* act = &last.act[(std::size_t(t) * k + s1) * F];
    const double* sech2 = &last.sech2[(std::size_t(t) * k + s1) * F];
    const double* q = &basis->Q[(std::size_t(s) * k + s1) * F];
    const double weight = gate[s1] + dg[s1];
    for (int f = 0; f < F; ++f) {
      const double tanh_dx = std::tanh(delta * q[f]);
      a[2 * k + s1 * F + f] = weight * (tanh_dx * sech2[f] / (1.0 + act[f] * tanh_dx));
    }
  }
  if (groups_.main_weight[t] != 0.0) {
    // 0.5||r + dh||^2 - 0.5||r||^2 = dh.r + 0.5||dh||^2 = a.(V r) + 0.5 a^T G a.
    double linear = 0.0, quadratic = 0.0;
    for (int i = 0; i < m; ++i) {
      if (a[i] == 0.0) continue;
      linear += a[i] * basis->Vr[i];
      const double* row = &basis->G[std::size_t(i) * m];
      double acc = 0.0;
      for (int j = 0; j < m; ++j) acc += row[j] * a[j];
      quadratic += a[i] * acc;
    }
    result.main = groups_.main_weight[t] * (linear + 0.5 * quadratic);
  }
  return result;
}

}  // namespace moe::reference
