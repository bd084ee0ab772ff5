#include "reference/elementwise.hpp"

#include <algorithm>
#include <cmath>
#include <limits>

#include "common/progress.hpp"
#include "reference/parallel.hpp"
#include "reference/richardson.hpp"

namespace moe::reference {
namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();

// The gate changes dg when logit j of the row moves by d (routing frozen), from expm1(+-d); false
// when none moves (a logit outside the top-k under normalized or sigmoid gates).
bool gateDeltaOfLogit(const TokenRow& row, const RouterShape& shape, int j, double expm1_d, double expm1_neg_d,
                      const std::vector<char>& in_topk, double* dnum, double* dg) {
  const int k = shape.top_k;
  if (!(shape.softmax && !shape.norm_topk_prob) && !in_topk[j]) return false;
  const double q = row.ex[j] * expm1_d;
  const double change = shape.softmax ? q : sigmoidDelta(row.sig[j], row.sig_neg[j], expm1_neg_d);
  for (int s = 0; s < k; ++s) dnum[s] = row.topk[s] == j ? change : 0.0;
  gateChange(row, k, shape.softmax, shape.norm_topk_prob, dnum, q, dg);
  return true;
}

}  // namespace

LogitGradients logitGradients(const LayerView& layer, const SuffixSensitivity* suffix,
                              const ReferenceOptions& options) {
  const RouterShape& shape = layer.shape;
  const Index T = shape.tokens;
  const int E = shape.experts, k = shape.top_k;
  const bool with_main = suffix != nullptr && suffix->withMain();
  const std::size_t TE = std::size_t(T) * E;
  LogitGradients out;
  // Sized without a fill: the workers write every row, zeros for the tokens that contribute nothing.
  out.aux.resize(TE);
  out.aux_err.resize(TE);
  out.main.resize(with_main ? TE : 0);
  out.main_err.resize(with_main ? TE : 0);
  const int workers = workerCount();
  struct Counters {
    std::int64_t ties = 0, frozen = 0;
    double max_step = 0.0;
    char pad[64];  // no false sharing between workers
  };
  std::vector<Counters> counters(workers);
  // expm1(+-step/2^level), shared by every element whose step was not shrunk.
  double table_plus[3], table_minus[3];
  for (int lev = 0; lev < 3; ++lev) {
    table_plus[lev] = std::expm1(options.step / double(1 << lev));
    table_minus[lev] = std::expm1(-options.step / double(1 << lev));
  }
  const bool plain_softmax = shape.softmax && !shape.norm_topk_prob;
  parallelFor(T, workers, [&](Index begin, Index end, int worker) {
    Scratch scratch(layer.hidden, E, k, layer.ffn);
    std::vector<char> in_topk(E, 0);
    Counters local;
    for (Index t = begin; t < end; ++t) {
      // aux_token: contributes aux/z terms at this layer; has_suffix: a later term depends on it.
      const bool aux_token = layer.groups.aux_group[t] >= 0 && layer.has_aux_terms;
      const bool has_suffix = suffix != nullptr && suffix->needed(t);
      if (!aux_token && !has_suffix) {
        const std::size_t row_begin = std::size_t(t) * E;
        for (FilledLater* v : {&out.aux, &out.aux_err, &out.main, &out.main_err})
          if (!v->empty()) std::fill(v->begin() + row_begin, v->begin() + row_begin + E, 0.0);
        continue;
      }
      const TokenRow row = tokenRow(layer.cache, shape, layer.groups, t);
      const double* rank = row.rank;
      const int* topk = row.topk;
      // Gate step step/4: the largest gate change a logit step produces (dg/dz = g(1-g) <= 1/4).
      if (has_suffix) suffix->compute(t, options.step / 4.0, scratch);
      // Top-k margins: the routed expert's key minus the best unrouted key for routed experts, the
      // weakest routed key minus the expert's own for the others; equal keys are a margin of 0. A
      // logit step d moves a logit by d and a score difference by at most d/2.
      for (int s = 0; s < k; ++s) in_topk[topk[s]] = 1;
      const double weakest_routed = rank[topk[k - 1]];
      double best_unrouted = -kInf;
      for (int e = 0; e < E; ++e)
        if (!in_topk[e]) best_unrouted = std::max(best_unrouted, rank[e]);
      for (int j = 0; j < E; ++j) {
        const double margin = in_topk[j] ? rank[j] - best_unrouted : weakest_routed - rank[j];
        double h = std::min(options.step, margin / 4.0);
        const bool shrunk = h < options.step;
        const bool frozen_by_margin = h < options.min_step;
        if (frozen_by_margin) h = options.step;  // routing frozen: the gradient of the current piece
        if (shrunk) ++local.ties;
        local.max_step = std::max(local.max_step, h);
        const bool tabled = h == options.step;
        // D(d) = [phi_local(+d) - phi_local(-d)] / 2d + sum_s psi_s [g_s(+d) - g_s(-d)] / 2d.
        double D_aux[3], D_main[3];
        bool routing_changed = false;
        double suffix_err_aux = 0.0, suffix_err_main = 0.0;
        // The suffix's share through gate s, and (at the largest step) its error and routing flips.
        const auto throughGate = [&](int lev, int s, double gate_slope) {
          D_aux[lev] += scratch.psi_aux[s] * gate_slope;
          D_main[lev] += scratch.psi_main[s] * gate_slope;
          if (lev > 0) return;
          suffix_err_aux += std::abs(gate_slope) * scratch.psi_aux_err[s];
          suffix_err_main += std::abs(gate_slope) * scratch.psi_main_err[s];
          if (gate_slope != 0.0 && scratch.psi_flipped[s]) routing_changed = true;
        };
        for (int lev = 0; lev < 3; ++lev) {
          const double d = h / double(1 << lev);
          const double em_plus = tabled ? table_plus[lev] : expm1Small(d);
          const double em_minus = tabled ? table_minus[lev] : expm1Small(-d);
          if (plain_softmax) {
            // The softmax gates without top-k normalization (Megatron's and DeepSeek-V3's default):
            // localDelta and gateChange written out with their shared denominator S + q (one division
            // per side instead of 1 + k), the same closed-form differences.
            const double inv_2d = 1.0 / (2.0 * d);
            const double q_up = row.ex[j] * em_plus, q_down = row.ex[j] * em_minus;
            const double inv_up = 1.0 / (row.S + q_up), inv_down = 1.0 / (row.S + q_down);
            if (aux_token) {
              const double w_minus_a = row.w[j] - row.a;
              double up = q_up * w_minus_a * inv_up, down = q_down * w_minus_a * inv_down;
              if (row.zw != 0.0) {
                const double dl_up = std::log1p(q_up / row.S), dl_down = std::log1p(q_down / row.S);
                up += row.zw * dl_up * (2.0 * row.lse + dl_up);
                down += row.zw * dl_down * (2.0 * row.lse + dl_down);
              }
              D_aux[lev] = (up - down) * inv_2d;
            } else {
              D_aux[lev] = 0.0;
            }
            D_main[lev] = 0.0;
            if (!has_suffix) continue;
            for (int s = 0; s < k; ++s) {
              const double own = topk[s] == j ? 1.0 : 0.0;
              const double dg_up = (own - row.gate[s]) * q_up * inv_up;
              const double dg_down = (own - row.gate[s]) * q_down * inv_down;
              const double gate_slope = (dg_up - dg_down) * inv_2d;
              throughGate(lev, s, gate_slope);
            }
            continue;
          }
          D_aux[lev] = aux_token ? (localDelta(row, shape.softmax, j, em_plus, em_minus) -
                                    localDelta(row, shape.softmax, j, em_minus, em_plus)) /
                                       (2.0 * d)
                                 : 0.0;
          D_main[lev] = 0.0;
          if (!has_suffix) continue;
          double* dg_up = scratch.dg_up.data();
          double* dg_down = scratch.dg_down.data();
          if (!gateDeltaOfLogit(row, shape, j, em_plus, em_minus, in_topk, scratch.dnum.data(), dg_up)) continue;
          gateDeltaOfLogit(row, shape, j, em_minus, em_plus, in_topk, scratch.dnum.data(), dg_down);
          for (int s = 0; s < k; ++s) {
            const double gate_slope = (dg_up[s] - dg_down[s]) / (2.0 * d);
            throughGate(lev, s, gate_slope);
          }
        }
        if (frozen_by_margin || routing_changed) ++local.frozen;
        // Richardson, plus the error of the suffix sensitivities carried through the gate slopes.
        const std::size_t at = std::size_t(t) * E + j;
        const Extrapolated aux = richardson(D_aux);
        out.aux[at] = aux.value;
        out.aux_err[at] = aux.error + suffix_err_aux;
        if (with_main) {
          const Extrapolated main = richardson(D_main);
          out.main[at] = main.value;
          out.main_err[at] = main.error + suffix_err_main;
        }
      }
      for (int s = 0; s < k; ++s) in_topk[topk[s]] = 0;
      progress::advance();  // one token's E logits differentiated: the watchdog sees work being done
    }
    counters[worker] = local;
  });
  for (const Counters& w : counters) {
    out.near_ties += w.ties;
    out.frozen += w.frozen;
    out.max_step = std::max(out.max_step, w.max_step);
  }
  return out;
}

}  // namespace moe::reference
