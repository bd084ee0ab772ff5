// Element-wise central differences of the objective with respect to every router logit of one layer
// (the reference's main method). Internal to src/reference.
#pragma once

#include <cstdint>
#include <vector>

#include "reference/layer_cache.hpp"
#include "reference/reference.hpp"

namespace moe::reference {

struct LogitGradients {
  FilledLater aux, aux_err;            // [T, E] d(J_aux + J_z)/dz and its error estimate
  FilledLater main, main_err;          // [T, E] dJ_main/dz (empty without the main loss)
  std::int64_t near_ties = 0;          // elements whose step was shrunk by a top-k margin
  std::int64_t frozen = 0;             // elements evaluated with the routing frozen
  double max_step = 0.0;
};

// A token's later layers and main loss (its "suffix") depend on its layer-l logits only through its
// k gate weights. Implementations give the sensitivities psi_s = d suffix / d g_s.
class SuffixSensitivity {
 public:
  virtual ~SuffixSensitivity() = default;
  virtual bool withMain() const = 0;
  // Whether token t's suffix depends on its gates (it contributes to a later term).
  virtual bool needed(Index t) const = 0;
  // Fills scratch.psi_aux/psi_main (and their errors, psi_flipped) for token t, differencing the
  // gates by +-gate_step / 2^level.
  virtual void compute(Index t, double gate_step, Scratch& scratch) const = 0;
};

// The layer's view the element-wise loop reads.
struct LayerView {
  const LayerCache& cache;
  const RouterShape& shape;
  const TokenGroups& groups;
  bool has_aux_terms;
  int hidden, ffn;  // for the scratch buffers
};

// d(J_aux + J_z)/dz_l and dJ_main/dz_l by per-token central differences: token t's own layer-l
// contribution in closed form (localDelta), plus its suffix through the k gate weights (chain rule at
// the gates, gate slopes again by central differences of gateChange). Each logit's step stays below
// its top-k margin (routing frozen below options.min_step). Rows of tokens that contribute nothing
// stay zero. `suffix` may be null (the last layer, or a layer-local objective).
LogitGradients logitGradients(const LayerView& layer, const SuffixSensitivity* suffix,
                              const ReferenceOptions& options);

}  // namespace moe::reference
