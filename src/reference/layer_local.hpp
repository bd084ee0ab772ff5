// The layer-local reference: dJ_l/dW_l of one layer's alpha*aux + beta*z-loss with the layer's input
// h_l given (no suffix through later layers), for checking a captured gradient of a real job whose
// router inputs were detached. The inputs are read in row blocks through a RowReader, converted to
// float64 one block at a time: no whole float64 copy of them is made.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "reference/objective.hpp"
#include "reference/reference.hpp"

namespace moe {

// Rows of a layer's router input, read as float64.
class RowReader {
 public:
  virtual ~RowReader() = default;
  // Writes rows [begin, begin + count) into out[count * hidden].
  virtual void read(std::int64_t begin, std::int64_t count, double* out) const = 0;
};

struct LayerLocalInputs {
  std::int64_t rows = 0;
  int hidden = 0, experts = 0;
  const RowReader* inputs = nullptr;            // h_l, [rows, H]
  const std::vector<double>* weight = nullptr;  // [E, H], nn.Linear's layout: z = h W^T
  std::vector<double> expert_bias;              // [E] added to the scores for the top-k choice, or empty
  std::vector<std::int64_t> topk;               // [rows, k] the job's own routing, or empty
  GroupAssignment groups;                       // aux and z-loss groups per row (main_group unused)
};

struct LayerLocalResult {
  std::vector<double> grad;  // [E, H] dJ_l/dW_l, in the weight's layout
  double fd_error = 0.0;     // absolute error bound of every element of grad
  double aux_value = 0.0, z_value = 0.0;
  std::int64_t empty_groups = 0;
  std::int64_t near_ties = 0, frozen_elements = 0;
  double max_step = 0.0;
  // Rows whose recorded top-k (as a set) differs from the top-k of the scores (+ bias); 0 when no
  // routing was recorded.
  std::int64_t routing_differs = 0;
  std::string method;
  double seconds = 0.0;
};

// The layer's objective (objective.aux_coeff, z_coeff, score, top_k, group_weighting; the groups from
// `inputs.groups`), differentiated element-wise per logit with the same closed-form differences,
// margins and Richardson extrapolation as computeReference, and the exact chain rule
// dJ/dW = (dJ/dz)^T h. Routing: the recorded top-k when given, else the top-k of the scores (+ bias).
LayerLocalResult computeLayerLocalReference(const LayerLocalInputs& inputs, const ObjectiveDefinition& objective,
                                            const ReferenceOptions& options = {});

}  // namespace moe
