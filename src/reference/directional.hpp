// Directional checks: the derivative of J_aux + J_z along random rank-one unit directions over all
// router weights, by central differences of a full forward recompute (every token and layer, routing
// and counts frozen). Internal to src/reference.
#pragma once

#include <cstdint>
#include <vector>

#include "reference/forward_cache.hpp"

namespace moe::reference {

// `count` directions, rank one per layer (V_l = scale_l u_l v_l^T with Gaussian u_l, v_l and a
// Gaussian split of the unit norm over the layers: V_l applied to every token costs O(T H) instead of
// a third [T,H]x[H,E] product). hidden_dot_u is sized but filled later (chain_rule.hpp hiddenPass).
std::vector<std::vector<RankOneDirection>> randomDirections(int count, int layers, int hidden, int experts,
                                                            std::int64_t tokens, std::uint64_t seed);

struct DirectionalResult {
  std::vector<std::vector<double>> direction;  // per layer [H, E]; unit norm over all layers
  double derivative = 0.0;
  double fd_error = 0.0;
};

// Central differences of J_aux + J_z along `direction` (step so that the largest logit change is
// about 1e-3), Richardson-extrapolated.
DirectionalResult directionalDerivative(const ForwardCache& cache, const std::vector<RankOneDirection>& direction);

}  // namespace moe::reference
