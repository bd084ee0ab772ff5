// The reference's per-layer cache (logits, scores, routing, gates, aux weights, expert activations)
// and the closed-form differences evaluated on it. Internal to src/reference.
//
// Every difference here is evaluated *as a difference* in closed form (expm1/log1p for the softmax
// sums and the logsumexp, sigma(x+d) - sigma(x) = -sigma(x+d) sigma(-x) expm1(-d), ratio changes
// (N+dN)/(S+dS) - N/S = (dN - (N/S) dS) / (S + dS)), never as the difference of two large values, so
// the differences keep full relative precision and the only finite-difference error left is
// truncation (then removed by Richardson extrapolation).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <memory>
#include <utility>
#include <vector>

#include "reference/arena.hpp"
#include "reference/objective.hpp"

namespace moe::reference {

using Index = std::int64_t;

// An allocator whose resize() leaves new doubles unset (default- instead of value-initialization), for
// the large buffers that are written in full right after they are sized: the first touch of each page
// then happens where the values are computed, on the workers, instead of in a serial zero fill (page
// faults were a third of a small reference's time). While a small reference runs, its blocks come
// from one region of huge pages (arena.hpp). Tried and dropped: mapping the pages populated up front
// in one thread (slower), and huge-page advice for every block of 2 MiB or more whatever the size of
// the run (it raised the DeepSeek-V3-size run's peak RSS to 3.10 GB, over its 3 GB bound; 2.99 GB
// without).
template <class T>
struct UninitializedAllocator : std::allocator<T> {
  template <class U>
  struct rebind {
    using other = UninitializedAllocator<U>;
  };
  UninitializedAllocator() = default;
  template <class U>
  UninitializedAllocator(const UninitializedAllocator<U>&) noexcept {}
  T* allocate(std::size_t n) {
    if (void* p = takeFromReferenceArena(n * sizeof(T))) return static_cast<T*>(p);
    return std::allocator<T>::allocate(n);
  }
  void deallocate(T* p, std::size_t n) {
    if (!inReferenceArena(p)) std::allocator<T>::deallocate(p, n);
  }
  template <class U>
  void construct(U* p) noexcept {
    ::new (static_cast<void*>(p)) U;
  }
  template <class U, class... Args>
  void construct(U* p, Args&&... args) {
    ::new (static_cast<void*>(p)) U(std::forward<Args>(args)...);
  }
};
using FilledLater = std::vector<double, UninitializedAllocator<double>>;

struct LayerCache {
  FilledLater hidden;             // [T, H] input of the layer (empty when the caller holds it)
  FilledLater logits;             // [T, E] z = h W
  FilledLater exp_shift;          // [T, E] exp(z - max_e z)
  std::vector<double> exp_sum;    // [T] sum_e exp(z - max)
  std::vector<double> lse;        // [T] logsumexp_e z
  std::vector<double> sig;        // [T, E] sigmoid(z)  (sigmoid score)
  std::vector<double> sig_neg;    // [T, E] sigmoid(-z) (sigmoid score)
  std::vector<double> sig_sum;    // [T] sum_e sigmoid(z)
  std::vector<double> rank_key;   // [T, E] score + expert bias when a bias picks the top-k, else empty
                                  // (the logits rank the experts: scores are monotone in them)
  std::vector<int> topk;          // [T, k] routed experts, best first
  std::vector<double> gate;       // [T, k] gate weights g
  std::vector<double> topk_sum;   // [T] sum of the top-k scores (exp_shift or sig): norm_topk_prob
  std::vector<double> aux_weight; // [groups, E] alpha*omega_G*E*c_{G,e} / (k*T_G^2)
  std::vector<double> aux_mean;   // [T] a_t = sum_e w_e p_{t,e} (token t's aux contribution)
  bool has_experts = false;
  FilledLater act;             // [T, k, F] tanh(h A_e) of the routed experts
  FilledLater sech2;           // [T, k, F] 1 - tanh^2(h A_e) = 1 / cosh^2(h A_e); empty for layer 0
                               // (its input never changes, so nothing reads it)
  FilledLater out;             // [T k, H] Expert_e(h) = tanh(h A_e) B_e grouped by expert, kept only
                               // while small (ForwardCache::expertOutput recomputes a row otherwise)
  std::vector<Index> out_row;  // [T, k] the row of `out` that holds slot (t, s)
  double aux_value = 0.0, z_value = 0.0;
};

// What the routing and scoring of one layer needs to know.
struct RouterShape {
  Index tokens = 0;
  int experts = 0, top_k = 1;
  bool softmax = true, norm_topk_prob = false;
};

// Scores, routing and gates from c.logits (already filled, [T, E]): exponentials, logsumexp, sigmoid
// pairs, top-k of the scores (+ `expert_bias` when given, [E]; ties -> lower index) and gate weights
// (the top-k scores, divided by their sum when norm_topk_prob; DeepSeek-V3 eqs. 13-15).
void scoreLayer(LayerCache& c, const RouterShape& shape, const std::vector<double>& expert_bias);

// Replaces the routing of scoreLayer by a recorded one ([T, k]; a capture's own choice) and
// recomputes the gates for it.
void forceRouting(LayerCache& c, const RouterShape& shape, const std::vector<std::int64_t>& topk);

// Counts, aux weights and the layer's J_aux and J_z terms (Megatron switch_load_balancing_loss_func,
// DeepSeek-V3 eqs. 17-20): c_{G,e} = #{t in G : e in topk(t)} (no gradient), P_{G,e} = (1/T_G)
// sum_t p_{t,e}, L_bal(G) = E/(k T_G) sum_e c_e P_e, J_aux = alpha * sum_G omega_G L_bal(G). Token t
// of group G contributes sum_e w_{G,e} p_{t,e} with w_{G,e} = alpha omega_G E c_e/(k T_G^2).
void aggregateAux(LayerCache& c, const RouterShape& shape, const TokenGroups& groups, double alpha);

// Token t's cached quantities at one layer.
struct TokenRow {
  Index t = 0;
  const double *z = nullptr, *ex = nullptr, *sig = nullptr, *sig_neg = nullptr, *w = nullptr, *gate = nullptr;
  const double* rank = nullptr;  // what ranks the experts: the logits, or score + bias
  const int* topk = nullptr;
  double S = 0.0, lse = 0.0, sig_sum = 0.0, a = 0.0, zw = 0.0, topk_sum = 0.0;
};
TokenRow tokenRow(const LayerCache& c, const RouterShape& shape, const TokenGroups& groups, Index t);

// sigma(x + d) - sigma(x) without cancellation and without a new exponential, from s = sigma(x),
// sn = sigma(-x) and expm1(-d): sigma(a) - sigma(b) = -sigma(a) sigma(-b) expm1(b - a), and
// sigma(x + d) = s / (s + sn e^{-d}).
inline double sigmoidDelta(double s, double sn, double expm1_of_minus_d) {
  const double shifted = s / (s + sn * (1.0 + expm1_of_minus_d));
  return -shifted * sn * expm1_of_minus_d;
}

// expm1(x) for the small arguments the differences use (logit steps <= 1e-3): for |x| <= 1e-2 its
// Taylor series to x^8/8!, whose first omitted term is below 3e-22 relative, evaluated by Horner's
// rule (a few ulps, as libm's expm1, at a fraction of its cost); libm's expm1 for larger |x|.
inline double expm1Small(double x) {
  if (!(std::fabs(x) <= 1e-2)) return std::expm1(x);
  double p = 1.0 / 40320.0;  // 1/8!
  p = p * x + 1.0 / 5040.0;
  p = p * x + 1.0 / 720.0;
  p = p * x + 1.0 / 120.0;
  p = p * x + 1.0 / 24.0;
  p = p * x + 1.0 / 6.0;
  p = p * x + 0.5;
  p = p * x + 1.0;
  return p * x;
}

inline double dot(const double* a, const double* b, int n) {
  double s = 0.0;
  for (int i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}

// The same sum in four interleaved partial sums, added pairwise at the end: four independent chains
// of multiply-adds instead of one (dot waits for each addition before the next), for the long dots
// over H of the per-token loops. Its rounding differs from dot's by a few units in the last place.
inline double dotInterleaved(const double* a, const double* b, int n) {
  double s0 = 0.0, s1 = 0.0, s2 = 0.0, s3 = 0.0;
  int i = 0;
  for (; i + 4 <= n; i += 4) {
    s0 += a[i] * b[i];
    s1 += a[i + 1] * b[i + 1];
    s2 += a[i + 2] * b[i + 2];
    s3 += a[i + 3] * b[i + 3];
  }
  for (; i < n; ++i) s0 += a[i] * b[i];
  return (s0 + s1) + (s2 + s3);
}

// Token t's layer-l aux+z contribution change when z[j] moves by d (counts fixed), from expm1_d =
// expm1(d) and expm1_neg_d = expm1(-d). O(1).
inline double localDelta(const TokenRow& row, bool softmax, int j, double expm1_d, double expm1_neg_d) {
  const double S = row.S;
  // Change of sum_e exp(z_e - m): only z_j moved.
  const double q = row.ex[j] * expm1_d;
  double delta;
  // a = N / S with N = sum_e w_e num_e: moving one numerator by w_j*q and the denominator by q
  // changes a by q (w_j - a) / (S + q).
  if (softmax) {
    delta = q * (row.w[j] - row.a) / (S + q);
  } else {
    // p = s / sum s; qs = sigma(z_j + d) - sigma(z_j).
    const double qs = sigmoidDelta(row.sig[j], row.sig_neg[j], expm1_neg_d);
    delta = qs * (row.w[j] - row.a) / (row.sig_sum + qs);
  }
  if (row.zw != 0.0) {
    // lse' - lse = log1p(q / S); lse'^2 - lse^2 = (lse' - lse)(lse' + lse).
    const double dl = std::log1p(q / S);
    delta += row.zw * dl * (2.0 * row.lse + dl);
  }
  return delta;
}

// The change dg[s] of a token's k gate weights (routing frozen) from the changes of the routed
// experts' score numerators dnum[s] (softmax: exp(z - m) changes; sigmoid: sigma changes) and of the
// softmax normalizer over all experts, d_all. The one gate-change formula of the reference: the
// element-wise derivatives (one logit moved) and the suffix propagation (every logit moved) both
// use it.
//   softmax:           g_s = exp_s / S                    -> (dnum_s - g_s d_all) / (S + d_all)
//   normalized top-k:  g_s = num_s / sum_topk num          -> (dnum_s - g_s dS_k) / (sum_topk + dS_k)
//   sigmoid:           g_s = sigma_s                       -> dnum_s
inline void gateChange(const TokenRow& row, int k, bool softmax, bool norm_topk_prob, const double* dnum,
                       double d_all, double* dg) {
  const double* gate = row.gate;
  if (softmax && !norm_topk_prob) {
    for (int s = 0; s < k; ++s) dg[s] = (dnum[s] - gate[s] * d_all) / (row.S + d_all);
  } else if (norm_topk_prob) {
    double d_topk = 0.0;
    for (int s = 0; s < k; ++s) d_topk += dnum[s];
    for (int s = 0; s < k; ++s) dg[s] = (dnum[s] - gate[s] * d_topk) / (row.topk_sum + d_topk);
  } else {
    for (int s = 0; s < k; ++s) dg[s] = dnum[s];
  }
}

// Per-thread scratch buffers of the element-wise and directional loops.
struct Scratch {
  std::vector<double> dh, dh_next, dz, em, ds, dg, dnum, dpre, du;
  std::vector<char> marked;
  // Suffix sensitivities of the current token to its k gate weights.
  std::vector<double> psi_aux, psi_main, psi_aux_err, psi_main_err, dg_up, dg_down;
  std::vector<char> psi_flipped;
  std::vector<double> basis_coeff;  // [2k + kF] coefficients on a TokenSuffixBasis (forward_cache.hpp)
  std::vector<double> out_row;      // [H] an expert output row being recomputed
  std::vector<double> gate_row;     // [H] buffer for a recomputed gate output row
  // The gate (layer, token, slot) being differenced: its expert output row (kept or in gate_row) and,
  // once computed for a last-layer gate, o.r and o.o.
  struct Gate {
    int layer = -1, slot = -1;
    Index token = -1;
    const double* row = nullptr;
    bool has_dots = false;
    double dot_r = 0.0, sq = 0.0;
  } gate;
  Scratch(int H, int E, int k, int F)
      : dh(H), dh_next(H), dz(E), em(E), ds(E), dg(k), dnum(k), dpre(std::max(F, 1)), du(std::max(F, 1)),
        marked(E, 0), psi_aux(k), psi_main(k), psi_aux_err(k), psi_main_err(k), dg_up(k), dg_down(k),
        psi_flipped(k), basis_coeff(2 * k + k * std::max(F, 0)), out_row(H), gate_row(H) {}
};

}  // namespace moe::reference
