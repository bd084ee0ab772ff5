#include "reference/layer_local.hpp"

#include <cblas.h>

#include <algorithm>
#include <chrono>
#include <cmath>

#include "common/errors.hpp"
#include "reference/chain_rule.hpp"
#include "reference/elementwise.hpp"
#include "reference/layer_cache.hpp"

namespace moe {
namespace {

using reference::Index;

// Rows per block: [block, H] float64 at H = 7168 is 28 MB.
constexpr Index kBlockRows = 512;

}  // namespace

LayerLocalResult computeLayerLocalReference(const LayerLocalInputs& in, const ObjectiveDefinition& objective,
                                            const ReferenceOptions& options) {
  const auto start = std::chrono::steady_clock::now();
  const Index T = in.rows;
  const int H = in.hidden, E = in.experts, k = objective.top_k;
  if (T < 0 || H <= 0 || E <= 0 || in.inputs == nullptr || in.weight == nullptr ||
      in.weight->size() != std::size_t(E) * H)
    throw std::invalid_argument("computeLayerLocalReference: inputs, a [E, H] weight and sizes > 0 expected");
  if (k < 1 || k > E) throw InputError("", "/objective/top_k", "1 <= top_k <= experts");
  if (!(options.step > 0.0) || !(options.min_step > 0.0))
    throw UsageError("reference options: step > 0 and min_step > 0 expected");
  if (!in.topk.empty() && in.topk.size() != std::size_t(T) * k)
    throw std::invalid_argument("computeLayerLocalReference: topk must be [rows, top_k]");

  // Pass 1: z = h W^T block by block (dgemm on float64 copies of one block), and the largest column
  // norm of h for the chain rule's error bound.
  reference::LayerCache cache;
  cache.logits.resize(std::size_t(T) * E);  // every block written by its dgemm
  std::vector<double> block(std::size_t(std::min<Index>(T, kBlockRows)) * H);
  std::vector<double> column_sq(H, 0.0);
  for (Index begin = 0; begin < T; begin += kBlockRows) {
    const Index n = std::min(kBlockRows, T - begin);
    in.inputs->read(begin, n, block.data());
    cblas_dgemm(CblasRowMajor, CblasNoTrans, CblasTrans, int(n), E, H, 1.0, block.data(), H, in.weight->data(), H,
                0.0, &cache.logits[std::size_t(begin) * E], E);
    for (Index r = 0; r < n; ++r)
      for (int i = 0; i < H; ++i) column_sq[i] += block[std::size_t(r) * H + i] * block[std::size_t(r) * H + i];
  }
  double max_column_norm = 0.0;
  for (double sq : column_sq) max_column_norm = std::max(max_column_norm, std::sqrt(sq));

  const reference::RouterShape shape{T, E, k, objective.score == ScoreFunction::kSoftmax, objective.norm_topk_prob};
  reference::scoreLayer(cache, shape, in.expert_bias);
  LayerLocalResult result;
  if (!in.topk.empty()) {
    for (Index t = 0; t < T; ++t) {
      std::vector<int> own(cache.topk.begin() + t * k, cache.topk.begin() + (t + 1) * k);
      std::vector<int> recorded(in.topk.begin() + t * k, in.topk.begin() + (t + 1) * k);
      std::sort(own.begin(), own.end());
      std::sort(recorded.begin(), recorded.end());
      if (own != recorded) ++result.routing_differs;
    }
    reference::forceRouting(cache, shape, in.topk);
  }
  const TokenGroups groups = weighGroups(in.groups, objective);
  reference::aggregateAux(cache, shape, groups, objective.aux_coeff);
  result.aux_value = cache.aux_value;
  result.z_value = cache.z_value;
  result.empty_groups = groups.empty_groups;

  const bool has_aux_terms = objective.aux_coeff != 0.0 || objective.z_coeff != 0.0;
  const reference::LayerView view{cache, shape, groups, has_aux_terms, H, 1};
  reference::LogitGradients g = reference::logitGradients(view, /*suffix=*/nullptr, options);
  result.near_ties = g.near_ties;
  result.frozen_elements = g.frozen;
  result.max_step = g.max_step;
  result.fd_error = reference::chainRuleErrorBound(max_column_norm, g.aux_err.data(), T, E);
  // Only the logit derivatives are needed from here on: give the cache's memory back first.
  cache = reference::LayerCache{};

  // Pass 2: dW = (dJ/dz)^T h [E, H], block by block.
  result.grad.assign(std::size_t(E) * H, 0.0);
  for (Index begin = 0; begin < T; begin += kBlockRows) {
    const Index n = std::min(kBlockRows, T - begin);
    in.inputs->read(begin, n, block.data());
    cblas_dgemm(CblasRowMajor, CblasTrans, CblasNoTrans, E, H, int(n), 1.0, &g.aux[std::size_t(begin) * E], E,
                block.data(), H, 1.0, result.grad.data(), H);
  }
  result.method =
      std::string("layer-local (router input given): central finite differences per router logit of each "
                  "token's aux and z-loss terms, evaluated as closed-form differences (Richardson h, h/2; "
                  "error from h/4; steps kept below the top-k margins) + exact chain rule dJ/dW = "
                  "(dJ/dz)^T h; routing ") +
      (in.topk.empty() ? "from the recorded scores" : "as recorded by the job");
  result.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  return result;
}

}  // namespace moe
