// Richardson extrapolation of a central difference, used for every derivative the reference reports.
#pragma once

#include <cmath>

namespace moe::reference {

struct Extrapolated {
  double value = 0.0;  // R(h) = (4 D(h/2) - D(h)) / 3
  double error = 0.0;  // 16/15 |R(h) - R(h/2)|: the O(h^4) term of R, estimated from one more level
};

// D[0], D[1], D[2]: central differences at steps h, h/2, h/4. The plain |D(h/2) - D(h)| / 3 estimates
// the error of D(h/2), not of R, and would overstate the error of the reported number by about
// (h^2 f''' / 24) / (h^4 f^(5) / 480), i.e. 1e4-1e5 at h = 1e-3.
// R(h) - R(h/2) = (5 D(h/2) - D(h) - 4 D(h/4)) / 3 is formed directly, so the error needs no division
// (one division per element instead of four: they were the per-logit loop's longest latency chain).
inline Extrapolated richardson(const double D[3]) {
  constexpr double kErrorScale = 16.0 / 45.0;  // 16/15 of R(h) - R(h/2), whose 1/3 is folded in
  const double r1 = (4.0 * D[1] - D[0]) / 3.0;
  return {r1, std::abs(5.0 * D[1] - D[0] - 4.0 * D[2]) * kErrorScale};
}

}  // namespace moe::reference
