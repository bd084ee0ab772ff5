// What a reference computation says about itself: how its numbers were produced, how reliable they
// are, and the objective's values. ReferenceResult extends it; the report carries it as it is.
// Torch-free, no dependencies.
#pragma once

#include <cstdint>
#include <string>

namespace moe {

struct ReferenceSummary {
  std::string method;              // human-readable description of how the numbers were produced
  double max_step = 0.0;           // the largest FD step used (logit units)
  double fd_error_estimate = 0.0;  // Richardson estimate, max over elements (and layers), absolute
  std::int64_t near_ties = 0;      // elements whose top-k margin forced a smaller step
  std::int64_t frozen_elements = 0;  // elements evaluated with the routing frozen (margin < min_step,
                                     // or a later layer's routing would have flipped)
  std::int64_t empty_groups = 0;   // aux groups with no token in their token set, left out of their mean
  double aux_value = 0.0;          // J_aux (alpha included), summed over layers
  double z_value = 0.0;            // J_z (beta included)
  double main_value = 0.0;         // main objective
  double seconds = 0.0;
};

}  // namespace moe
