// splitmix64 (Steele, Lea, Flood 2014) with Box-Muller normals: a tiny generator with a fixed
// specification, so data and random directions are identical on every machine and library version
// (no <random> distributions, whose output differs across standard libraries).
#pragma once

#include <cmath>
#include <cstdint>

namespace moe {

class SplitMix64 {
 public:
  explicit SplitMix64(std::uint64_t seed) : state_(seed) {}
  std::uint64_t next() {
    std::uint64_t z = (state_ += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
  }
  // The state after n more calls of next(), in O(1): the generator is a counter (Weyl sequence) run
  // through a mixing function, so a stream can be cut into pieces filled independently.
  void skip(std::uint64_t n) { state_ += n * 0x9E3779B97F4A7C15ull; }
  // Uniform in (0, 1): 53 random bits, never 0.
  double uniform() { return (static_cast<double>(next() >> 11) + 0.5) * 0x1.0p-53; }
  // Standard normal by Box-Muller (one value per call, two next() calls; the second value is discarded).
  double normal() {
    const double u1 = uniform(), u2 = uniform();
    return std::sqrt(-2.0 * std::log(u1)) * std::cos(6.283185307179586476925 * u2);
  }

 private:
  std::uint64_t state_;
};

}  // namespace moe
