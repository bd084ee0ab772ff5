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
  Delta propagateHiddenChange(int l0, Index t, bool include_main, Scratch& scratch) const;

  // The change of token t's aux+z contributions when every router weight moves by eps V_l (routing
  // frozen). em_first: expm1 of layer 0's logit changes, computed by the caller.
  double propagateDirection(Index t, const std::vector<RankOneDirection>& direction, double eps,
                            const double* em_first, Scratch& scratch) const;

 private:
  void forwardLayer(int l, bool experts);
  // One layer of a propagation: from the logit changes dz (or, when given, their expm1) to the
  // layer's aux+z change (added to delta) and, when `later`, the hidden change entering layer l+1
  // (scratch.dh_next, from scratch.dh unless dh_zero).
  void stepLayer(int l, Index t, const double* given_expm1, bool dh_zero, bool later, Delta& delta,
                 bool check_routing, Scratch& scratch) const;

  const ProblemData& data_;
  const ObjectiveDefinition& obj_;
  bool with_main_, last_layer_experts_;
  Index T_ = 0;
  int H_ = 0, E_ = 0, F_ = 0, L_ = 0, k_ = 0;
  bool has_aux_terms_ = false;
  RouterShape shape_;
  TokenGroups groups_;
  std::vector<LayerCache> layers_;
  std::vector<double> final_hidden_;  // h_L (when the last layer's experts are computed)
  std::vector<double> residual_;      // [T, H] h_L - y (with_main)
  double main_value_ = 0.0;
};

}  // namespace moe::reference
