// One float64 forward pass of the whole model over the whole global batch, cached per layer, and the
// per-token recomputations the reference differentiates: a hidden-state change of one token carried
// through its later layers (its "suffix"), and the change of every layer along a direction over all
// router weights. The model has no attention, so a change to token t's path touches token t only.
// Internal to src/reference.
#pragma once

#include <vector>

#include "data/problem.hpp"
#include "reference/layer_cache.hpp"
#include "reference/objective.hpp"

namespace moe::reference {

// A rank-one direction of the directional checks for one layer: V_l = scale * u v^T.
struct RankOneDirection {
  std::vector<double> u;  // [H]
  std::vector<double> v;  // [E]
  double scale = 0.0;
  std::vector<double> hidden_dot_u;  // [T] h_l[t] . u at the unperturbed point
  std::vector<double> prev_out_dot_u;  // [T, k] out_{l-1}[t, s] . u (layer 1 only; empty elsewhere)
};

// Per-token products for the change of the last layer and the main loss when a gate of the layer
// below moves (ForwardCache::gateSuffixChange): with V the m = 2k + kF rows {out_l[t, s] (k rows),
// out_{L-1}[t, s'] (k), the rows f of B_{e'} of the last layer's routed experts (k F)}, the hidden
// change after the last layer is a combination a^T V, so the main loss change
// dh.r + 0.5 ||dh||^2 = a.(V r) + 0.5 a^T (V V^T) a needs no H-length work per evaluation.
struct TokenSuffixBasis {
  int m = 0;
  std::vector<double> V;   // [m, H]
  std::vector<double> G;   // [m, m] V V^T
  std::vector<double> Vr;  // [m] V r (r = h_L - y)
  std::vector<double> Q;   // [k, k, F] out_l[t, s] . A_{e'_{s'}}[:, f]: the last layer's expert input change
};

// Change of token t's contributions.
struct Delta {
  double aux = 0.0;   // to J_aux + J_z
  double main = 0.0;  // to J_main
  bool routing_changed = false;
};

class ForwardCache {
 public:
  ForwardCache(const ProblemData& data, const ObjectiveDefinition& objective, bool with_main,
               bool last_layer_experts);

  // The layers keep their [T, k, H] expert outputs while all of them fit in `bytes` (default 256 MiB;
  // above, 1.9 GB per layer at DeepSeek-V3 size, rows are recomputed from the [T, k, F] activations).
  // Call before forward().
  void keepExpertOutputsUpTo(double bytes);
  // The rule keepExpertOutputsUpTo applies: the L layers' [T, k, H] outputs fit in `bytes`.
  static bool expertOutputsFit(double tokens, int top_k, int hidden, int layers, double bytes) {
    return 8.0 * tokens * top_k * hidden * layers <= bytes;
  }

  // One full forward pass with routing recomputed.
  void forward();

  const ProblemData& data() const { return data_; }
  const ObjectiveDefinition& objective() const { return obj_; }
  const TokenGroups& groups() const { return groups_; }
  const RouterShape& shape() const { return shape_; }
  const LayerCache& layer(int l) const { return layers_[l]; }
  const double* hidden(int l) const { return l == 0 ? data_.x.data() : layers_[l].hidden.data(); }
  double mainValue() const { return main_value_; }
  bool withMain() const { return with_main_; }
  bool hasAuxTerms() const { return has_aux_terms_; }
  int layers() const { return L_; }
  int hiddenSize() const { return H_; }
  int ffn() const { return F_; }
  // Token t contributes aux or z-loss terms (at every layer).
  bool auxToken(Index t) const { return groups_.aux_group[t] >= 0 && has_aux_terms_; }

  // Carries scratch.dh, a change of token t's hidden state entering layer l0, through layers
  // l0..L-1 with the routing frozen: the change of token t's aux+z contributions (and of its main
  // loss when include_main), and whether a later routing would have flipped.
  // With dz_given, scratch.dz already holds layer l0's logit change (dh W_l0 is not recomputed).
  Delta propagateHiddenChange(int l0, Index t, bool include_main, Scratch& scratch, bool dz_given = false) const;

  // The change of token t's aux+z contributions when every router weight moves by eps V_l (routing
  // frozen). em_first: expm1 of layer 0's logit changes, computed by the caller. Layer 1's logit
  // change uses the products of prepareSuffixProducts and out_dot_u (below) when they are there.
  double propagateDirection(Index t, const std::vector<RankOneDirection>& direction, double eps,
                            const double* em_first, Scratch& scratch) const;

  // Computes, for every layer l below the last, out_l[t, s] . W_{l+1} for all tokens and slots in one
  // dgemm ([T k, H] x [H, E]): a gate change of layer l moves layer l+1's logits along these rows, so
  // the per-token propagations start without an H x E product per evaluation. Call after forward().
  void prepareSuffixProducts();
  // out_0[t, s] . u for every token and slot ([T, k]): the directional checks' layer-1 term.
  std::vector<double> firstOutputsDot(const double* u) const;

  // The change of token t's later contributions (aux+z of layers l+1.., and the main loss when
  // include_main) when its layer-l gate g_s moves by `delta`, i.e. h_{l+1}[t] by delta out_l[t, s];
  // routing frozen, flips of a later routing reported. `basis` (from buildSuffixBasis, for l = L-2
  // with the main loss) replaces the last layer's H-length work; null takes the general path.
  Delta gateSuffixChange(int l, Index t, int s, double delta, bool include_main, const TokenSuffixBasis* basis,
                         Scratch& scratch) const;
  // Whether buildSuffixBasis pays off for this model (its cost per token against the general path's).
  bool suffixBasisPaysOff() const;
  void buildSuffixBasis(int l, Index t, TokenSuffixBasis& basis) const;
  // out_l[t, s] = tanh(h_l[t] A_e) B_e of token t's slot s: the kept row, or one recomputed from the
  // cached activations into `row` ([H]).
  const double* expertOutput(int l, Index t, int s, double* row) const;

 private:
  void forwardLayer(int l, bool experts);
  // Token t's rows [k, E] of out_l[t, s] W_{l+1} (prepareSuffixProducts), or null when not prepared.
  const double* nextLogitProducts(int l, Index t) const;
  // expertOutput of (l, t, s), found once for consecutive calls (scratch.gate).
  const double* gateOutput(int l, Index t, int s, Scratch& scratch) const;
  // One layer of a propagation: from the logit changes dz (or, when given, their expm1) to the
  // layer's aux+z change (added to delta) and, when `later`, the hidden change entering layer l+1
  // (scratch.dh_next, from scratch.dh unless dh_zero).
  // form_next = false stops after the gate changes (the caller needs no hidden change).
  void stepLayer(int l, Index t, const double* given_expm1, bool dh_zero, bool later, Delta& delta,
                 bool check_routing, Scratch& scratch, bool form_next = true) const;
  // stepLayer's first half: from dz (or its expm1) to the aux+z change, the routing check and, when
  // `gates`, the gate changes scratch.dg. Returns the change of the softmax normalizer.
  double stepLogits(int l, Index t, const double* given_expm1, Delta& delta, bool check_routing, bool gates,
                    Scratch& scratch) const;

  const ProblemData& data_;
  const ObjectiveDefinition& obj_;
  bool with_main_, last_layer_experts_;
  Index T_ = 0;
  int H_ = 0, E_ = 0, F_ = 0, L_ = 0, k_ = 0;
  bool has_aux_terms_ = false;
  bool keep_outputs_ = false;  // keepExpertOutputsUpTo
  RouterShape shape_;
  TokenGroups groups_;
  std::vector<LayerCache> layers_;
  FilledLater final_hidden_;  // h_L (when the last layer's experts are computed), until forward()
                              // turns it into residual_ (with_main)
  FilledLater residual_;      // [T, H] h_L - y (with_main)
  std::vector<std::vector<double>> next_logits_of_out_;  // [l][T, k, E] out_l . W_{l+1} (prepareSuffixProducts)
  double main_value_ = 0.0;
};

}  // namespace moe::reference
