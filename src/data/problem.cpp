#include "data/problem.hpp"

#include <cmath>

#include "common/errors.hpp"

namespace moe {
namespace {

// splitmix64 (Steele, Lea, Flood 2014): a tiny, well-mixed generator with a fixed specification, so
// the data of a scenario is the same on every machine and library version.
class SplitMix64 {
 public:
  explicit SplitMix64(std::uint64_t seed) : state_(seed) {}
  std::uint64_t next() {
    std::uint64_t z = (state_ += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
  }
  // Uniform in (0, 1): 53 random bits, never 0.
  double uniform() { return (static_cast<double>(next() >> 11) + 0.5) * 0x1.0p-53; }
  // Standard normal by Box-Muller (one value per call; the second is discarded for simplicity).
  double normal() {
    const double u1 = uniform(), u2 = uniform();
    return std::sqrt(-2.0 * std::log(u1)) * std::cos(6.283185307179586476925 * u2);
  }

 private:
  std::uint64_t state_;
};

void fillNormal(std::vector<double>& v, std::size_t n, double stddev, SplitMix64& rng) {
  v.resize(n);
  for (auto& e : v) e = stddev * rng.normal();
}

}  // namespace

ProblemData generateProblem(const Scenario& sc) {
  ProblemData d;
  d.batch = sc.data.batch;
  d.seq_len = sc.data.seq_len;
  d.hidden = sc.model.hidden;
  d.experts = sc.model.experts;
  d.ffn = sc.model.ffn;
  d.layers = sc.model.layers;
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
