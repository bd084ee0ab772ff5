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
inline Extrapolated richardson(const double D[3]) {
  const double r1 = (4.0 * D[1] - D[0]) / 3.0, r2 = (4.0 * D[2] - D[1]) / 3.0;
  return {r1, std::abs(r1 - r2) * 16.0 / 15.0};
}

}  // namespace moe::reference
