#include "reference/directional.hpp"

#include <algorithm>
#include <cmath>

#include "data/splitmix64.hpp"
#include "reference/parallel.hpp"
#include "reference/richardson.hpp"

namespace moe::reference {

std::vector<std::vector<RankOneDirection>> randomDirections(int count, int layers, int hidden, int experts,
                                                            std::int64_t tokens, std::uint64_t seed) {
  const int L = layers, H = hidden, E = experts;
  SplitMix64 rng(seed);
  std::vector<std::vector<RankOneDirection>> directions(count, std::vector<RankOneDirection>(L));
  for (auto& dir : directions) {
    double layer_norm_sq = 0.0;
    std::vector<double> layer_share(L);
    for (int l = 0; l < L; ++l) {
      layer_share[l] = L == 1 ? 1.0 : rng.normal();
      layer_norm_sq += layer_share[l] * layer_share[l];
    }
    for (int l = 0; l < L; ++l) {
      RankOneDirection& d = dir[l];
      d.u.resize(H);
      d.v.resize(E);
      for (auto& value : d.u) value = rng.normal();
      for (auto& value : d.v) value = rng.normal();
      const double nu = std::sqrt(dot(d.u.data(), d.u.data(), H)), nv = std::sqrt(dot(d.v.data(), d.v.data(), E));
      d.scale = layer_share[l] / std::sqrt(layer_norm_sq) / (nu * nv);
      d.hidden_dot_u.resize(tokens);
    }
  }
  return directions;
}

DirectionalResult directionalDerivative(const ForwardCache& cache, const std::vector<RankOneDirection>& dir) {
  const RouterShape& shape = cache.shape();
  const Index T = shape.tokens;
  const int E = shape.experts, L = cache.layers(), H = cache.hiddenSize();
  DirectionalResult result;
  double logit_scale = 0.0;  // max |h_l[t] . V_l[:, e]|: logit change per unit step
  result.direction.resize(L);
  for (int l = 0; l < L; ++l) {
    const RankOneDirection& d = dir[l];
    double max_hu = 0.0, max_v = 0.0;
    for (double value : d.hidden_dot_u) max_hu = std::max(max_hu, std::abs(value));
    for (double value : d.v) max_v = std::max(max_v, std::abs(value));
    logit_scale = std::max(logit_scale, std::abs(d.scale) * max_hu * max_v);
    auto& dense = result.direction[l];
    dense.resize(std::size_t(H) * E);
    for (int i = 0; i < H; ++i)
      for (int e = 0; e < E; ++e) dense[std::size_t(i) * E + e] = d.scale * d.u[i] * d.v[e];
  }
  // Largest logit change ~1e-3 at the largest step.
  const double eps = logit_scale > 0.0 ? 1e-3 / logit_scale : 1e-3;

  // per_token[lev][t]: token t's contribution change at +eps/2^lev minus the one at -eps/2^lev.
  std::vector<std::vector<double>> per_token(3, std::vector<double>(T, 0.0));
  const RankOneDirection& first = dir[0];
  parallelFor(T, workerCount(), [&](Index begin, Index end, int) {
    Scratch scratch(H, E, shape.top_k, cache.ffn());
    // Layer 0 logits move linearly in the step: dz = step * scale * (x_t . u) v. expm1 at the smallest
    // step, then expm1(2y) = expm1(y) (expm1(y) + 2) for the larger ones (no new exponential).
    std::vector<double> em_up[3], em_down[3];
    for (int lev = 0; lev < 3; ++lev) em_up[lev].resize(E), em_down[lev].resize(E);
    for (Index t = begin; t < end; ++t) {
      if (!cache.auxToken(t)) continue;
      const double slope = eps / 4.0 * first.scale * first.hidden_dot_u[t];
      for (int e = 0; e < E; ++e) {
        em_up[2][e] = expm1Small(slope * first.v[e]);
        em_down[2][e] = expm1Small(-slope * first.v[e]);
      }
      for (int lev = 1; lev >= 0; --lev)
        for (int e = 0; e < E; ++e) {
          em_up[lev][e] = em_up[lev + 1][e] * (em_up[lev + 1][e] + 2.0);
          em_down[lev][e] = em_down[lev + 1][e] * (em_down[lev + 1][e] + 2.0);
        }
      for (int lev = 0; lev < 3; ++lev) {
        const double d = eps / double(1 << lev);
        const double up = cache.propagateDirection(t, dir, d, em_up[lev].data(), scratch);
        const double down = cache.propagateDirection(t, dir, -d, em_down[lev].data(), scratch);
        per_token[lev][t] = up - down;
      }
    }
  });
  double D[3];
  for (int lev = 0; lev < 3; ++lev) {
    double sum = 0.0;
    for (Index t = 0; t < T; ++t) sum += per_token[lev][t];
    D[lev] = sum / (2.0 * eps / double(1 << lev));
  }
  const Extrapolated r = richardson(D);
  result.derivative = r.value;
  result.fd_error = r.error;
  return result;
}

}  // namespace moe::reference
