#include "data/problem.hpp"
#include "data/splitmix64.hpp"

#include <cmath>

#include "common/errors.hpp"

namespace moe {
namespace {


void fillNormal(std::vector<double>& v, std::size_t n, double stddev, SplitMix64& rng) {
  v.resize(n);
  for (auto& e : v) e = stddev * rng.normal();
}

}  // namespace

ProblemData problemShapeOf(const Scenario& sc) {
  ProblemData d;
  d.batch = sc.data.batch;
  d.seq_len = sc.data.seq_len;
  d.hidden = sc.model.hidden;
  d.experts = sc.model.experts;
  d.ffn = sc.model.ffn;
  d.layers = sc.model.layers;
  return d;
}

ProblemData generateProblem(const Scenario& sc) {
  ProblemData d = problemShapeOf(sc);
  const std::size_t B = d.batch, S = d.seq_len, H = d.hidden, E = d.experts, F = d.ffn;
  // Independent streams per tensor so that changing one size does not reshuffle the others.
  SplitMix64 rx(sc.seed * 7919 + 1), ry(sc.seed * 7919 + 2);
  fillNormal(d.x, B * S * H, 1.0, rx);
  fillNormal(d.y, B * S * H, 1.0, ry);
  d.valid.assign(B * S, 1);
  for (std::size_t b = 0; b < B; ++b) {
    const int len = b < sc.data.valid_lengths.size() ? sc.data.valid_lengths[b] : d.seq_len;
    for (std::size_t s = 0; s < S; ++s) d.valid[b * S + s] = static_cast<int>(s) < len ? 1 : 0;
  }
  d.router_weight.resize(d.layers);
  d.expert_in.resize(d.layers);
  d.expert_out.resize(d.layers);
  for (int l = 0; l < d.layers; ++l) {
    SplitMix64 rw(sc.seed * 7919 + 100 + 3 * l), ra(sc.seed * 7919 + 101 + 3 * l),
        rb(sc.seed * 7919 + 102 + 3 * l);
    fillNormal(d.router_weight[l], H * E, 1.0 / std::sqrt(double(H)), rw);
    fillNormal(d.expert_in[l], E * H * F, 1.0 / std::sqrt(double(H)), ra);
    fillNormal(d.expert_out[l], E * F * H, 1.0 / std::sqrt(double(F)), rb);
  }
  return d;
}

}  // namespace moe
