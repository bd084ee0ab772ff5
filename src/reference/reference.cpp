#include "reference/reference.hpp"

#include <algorithm>
#include <chrono>

#include "common/errors.hpp"
#include "reference/chain_rule.hpp"
#include "reference/directional.hpp"
#include "reference/elementwise.hpp"
#include "reference/forward_cache.hpp"
#include "reference/parallel.hpp"
#include "reference/richardson.hpp"

namespace moe {
namespace {

using reference::ForwardCache;
using reference::Index;
using reference::Scratch;

// The suffix of a layer below the last (or any layer, with the main loss): sensitivities of a token's
// later aux/z terms and main loss to its k gate weights, by central differences of the suffix
// recomputed for that one token with g_s moved by +-step/2^level (Richardson as for the logits).
// The recompute is exact (no linearization); what is precomputed (forward_cache.hpp) only regroups
// the same products: layer l+1's logit change delta (out_s W_{l+1}), and for the layer below the
// last with the main loss, the last layer's expert inputs and the main loss on a per-token basis.
class ForwardSuffix : public reference::SuffixSensitivity {
 public:
  ForwardSuffix(const ForwardCache& cache, int layer, bool use_basis)
      : cache_(cache), l_(layer), use_basis_(use_basis && cache.withMain() && layer + 2 == cache.layers()) {}
  bool withMain() const override { return cache_.withMain(); }
  bool needed(Index t) const override {
    const bool main_token = cache_.withMain() && cache_.groups().main_weight[t] != 0.0;
    return (l_ < cache_.layers() - 1 && cache_.auxToken(t)) || main_token;
  }
  void compute(Index t, double step, Scratch& scratch) const override {
    const int k = cache_.shape().top_k;
    // The last layer and the main loss on a per-token basis (forward_cache.hpp) where it pays off.
    thread_local reference::TokenSuffixBasis basis;
    const bool with_basis = use_basis_ && cache_.groups().main_weight[t] != 0.0;
    if (with_basis) cache_.buildSuffixBasis(l_, t, basis);
    for (int s = 0; s < k; ++s) {
      double D_aux[3], D_main[3];
      bool flipped = false;
      for (int lev = 0; lev < 3; ++lev) {
        const double d = step / double(1 << lev);
        const reference::TokenSuffixBasis* b = with_basis ? &basis : nullptr;
        const reference::Delta up = cache_.gateSuffixChange(l_, t, s, d, cache_.withMain(), b, scratch);
        const reference::Delta down = cache_.gateSuffixChange(l_, t, s, -d, cache_.withMain(), b, scratch);
        flipped = flipped || up.routing_changed || down.routing_changed;
        D_aux[lev] = (up.aux - down.aux) / (2.0 * d);
        D_main[lev] = (up.main - down.main) / (2.0 * d);
      }
      const reference::Extrapolated aux = reference::richardson(D_aux), main = reference::richardson(D_main);
      scratch.psi_aux[s] = aux.value;
      scratch.psi_aux_err[s] = aux.error;
      scratch.psi_main[s] = main.value;
      scratch.psi_main_err[s] = main.error;
      scratch.psi_flipped[s] = flipped ? 1 : 0;
    }
  }

 private:
  const ForwardCache& cache_;
  int l_;
  bool use_basis_;
};

// The bytes of the FilledLater buffers (layer_cache.hpp) one computeReference allocates: per layer its
// logits and exponentials [T, E], activations [T, k, F], the kept expert outputs [T k, H] and the four
// logit-gradient buffers [T, E]; after layer 0 also its input [T, H] and sech^2 [T, k, F]; then
// h_L - y [T, H].
std::size_t filledLaterBytes(const ProblemData& data, const ObjectiveDefinition& objective,
                             const ReferenceOptions& options) {
  const double T = double(data.tokens()), H = data.hidden, E = data.experts, F = data.ffn, k = objective.top_k,
               L = data.layers;
  const bool keep_outputs = ForwardCache::expertOutputsFit(T, objective.top_k, data.hidden, data.layers,
                                                           options.max_kept_expert_output_bytes);
  const double per_layer = 2 * T * E + T * k * F + (keep_outputs ? T * k * H : 0.0) + 4 * T * E;
  const double after_first = T * H + T * k * F;
  const double total = 8.0 * (L * per_layer + (L - 1) * after_first + T * H);
  return total > double(reference::ReferenceArenaScope::kMaxBytes) ? 0 : static_cast<std::size_t>(total);
}

}  // namespace

ObjectiveValue evaluateObjective(const ProblemData& data, const ObjectiveDefinition& objective) {
  ForwardCache model(data, objective, /*with_main=*/true, /*last_layer_experts=*/true);
  model.forward();
  ObjectiveValue value;
  for (int l = 0; l < data.layers; ++l) {
    value.aux += model.layer(l).aux_value;
    value.z += model.layer(l).z_value;
  }
  value.main = model.mainValue();
  return value;
}

ReferenceResult computeReference(const ProblemData& data, const ObjectiveDefinition& objective,
                                 const ReferenceOptions& options) {
  const auto start = std::chrono::steady_clock::now();
  if (!(options.step > 0.0) || !(options.min_step > 0.0) || options.directional_checks < 0)
    throw UsageError("reference options: step > 0, min_step > 0 and directional_checks >= 0 expected");
  // A small reference's buffers from one region of huge pages (arena.hpp); declared before the cache
  // that holds them, so that they are gone before the region is.
  const reference::ReferenceArenaScope arena(filledLaterBytes(data, objective, options));
  // The last layer's experts only matter for the main loss.
  ForwardCache model(data, objective, options.with_main, options.with_main);
  model.keepExpertOutputsUpTo(options.max_kept_expert_output_bytes);
  model.forward();
  model.prepareSuffixProducts();
  const auto secondsSince = [](std::chrono::steady_clock::time_point t) {
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - t).count();
  };
  ReferenceResult result;
  result.phases.forward_s = secondsSince(start);
  const auto t_gradients = std::chrono::steady_clock::now();
  const Index T = data.tokens();
  const int H = data.hidden, E = data.experts, L = data.layers;
  auto directions =
      reference::randomDirections(options.directional_checks, L, H, E, T, options.direction_seed);
  if (L >= 2)
    for (auto& dir : directions) dir[1].prev_out_dot_u = model.firstOutputsDot(dir[1].u.data());

  result.layers.resize(L);
  result.empty_groups = model.groups().empty_groups;
  for (int l = 0; l < L; ++l) {
    ReferenceLayer& out = result.layers[l];
    out.aux_value = model.layer(l).aux_value;
    out.z_value = model.layer(l).z_value;
    result.aux_value += out.aux_value;
    result.z_value += out.z_value;
    const double* h = model.hidden(l);
    std::vector<const double*> us;
    std::vector<double*> dots;
    for (auto& dir : directions) {
      us.push_back(dir[l].u.data());
      dots.push_back(dir[l].hidden_dot_u.data());
    }
    const double max_column_norm = reference::hiddenPass(h, T, H, us, dots);
    const bool basis = options.suffix_basis == SuffixBasis::kAlways ||
                       (options.suffix_basis == SuffixBasis::kAuto && model.suffixBasisPaysOff());
    const ForwardSuffix suffix(model, l, basis);
    const reference::LayerView view{model.layer(l), model.shape(), model.groups(), model.hasAuxTerms(), H,
                                    data.ffn};
    const reference::LogitGradients g = reference::logitGradients(view, &suffix, options);
    result.near_ties += g.near_ties;
    result.frozen_elements += g.frozen;
    result.max_step = std::max(result.max_step, g.max_step);
    // dJ/dW = h^T dJ/dz for the aux and (with_main) the main gradients: small products side by side on
    // two workers (each single-threaded), large ones one after the other with the whole BLAS.
    const bool small_products = double(T) * H * E < reference::kSmallBlasWork;
    const int chain_workers = small_products ? reference::workerCount() : 1;
    reference::parallelFor(options.with_main ? 2 : 1, chain_workers, [&](Index begin, Index end, int) {
      for (Index which = begin; which < end; ++which) {
        if (which == 0) {
          out.aux_grad = reference::chainRule(h, g.aux.data(), T, H, E);
          out.aux_fd_error = reference::chainRuleErrorBound(max_column_norm, g.aux_err.data(), T, E);
        } else {
          out.main_grad = reference::chainRule(h, g.main.data(), T, H, E);
          out.main_fd_error = reference::chainRuleErrorBound(max_column_norm, g.main_err.data(), T, E);
        }
      }
    });
    result.fd_error_estimate = std::max(result.fd_error_estimate, out.aux_fd_error);
  }
  if (options.with_main) result.main_value = model.mainValue();
  result.phases.gradients_s = secondsSince(t_gradients);

  const auto t_directional = std::chrono::steady_clock::now();
  for (const auto& dir : directions) {
    reference::DirectionalResult d = reference::directionalDerivative(model, dir);
    result.directional.push_back({std::move(d.direction), d.derivative, d.fd_error});
  }
  result.phases.directional_s = secondsSince(t_directional);

  result.method =
      "central finite differences per router logit of each token's own contribution, evaluated as "
      "closed-form differences (Richardson h, h/2; error from h/4; steps kept below the top-k "
      "margins; later layers and main loss by per-token suffix recompute with routing frozen, "
      "differentiated along the token's k gate weights) + exact chain rule dJ/dW = h^T dJ/dz; "
      "directional checks along random rank-one unit directions (all tokens and layers, routing "
      "frozen)";
  result.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  return result;
}

}  // namespace moe
