#include "data/problem.hpp"

#include <algorithm>
#include <cmath>
#include <thread>
#include <vector>

#include "common/errors.hpp"
#include "data/splitmix64.hpp"

namespace moe {
namespace {


// v[i] = stddev * the i-th normal of rng's stream; rng ends where a sequential fill would leave it.
// Large fills are cut into one piece per core (SplitMix64::skip): the values do not depend on the
// number of pieces.
void fillNormal(std::vector<double>& v, std::size_t n, double stddev, SplitMix64& rng) {
  v.resize(n);
  const unsigned cores = std::max(1u, std::thread::hardware_concurrency());
  const std::size_t pieces = n < (std::size_t(1) << 20) ? 1 : std::min<std::size_t>(cores, 16);
  const std::size_t chunk = (n + pieces - 1) / pieces;
  const auto fill = [&v, n, chunk, stddev](SplitMix64 piece_rng, std::size_t piece) {
    const std::size_t begin = piece * chunk, end = std::min(n, begin + chunk);
    piece_rng.skip(2 * begin);  // normal() takes two draws
    for (std::size_t i = begin; i < end; ++i) v[i] = stddev * piece_rng.normal();
  };
  std::vector<std::thread> threads;
  for (std::size_t p = 1; p < pieces; ++p) threads.emplace_back(fill, rng, p);
  fill(rng, 0);
  for (auto& t : threads) t.join();
  rng.skip(2 * n);
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
