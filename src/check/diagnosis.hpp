// Names what is wrong when a mesh's aux gradient differs from the reference (DESIGN §6): missing,
// scaled by a product of mesh quantities, turned, or non-linear in the coefficient.
#pragma once

#include <optional>
#include <string>
#include <vector>

#include "report/report.hpp"

namespace moe {

// The mesh quantities a scale can be attributed to.
struct MeshQuantities {
  int dp = 1, pp = 1, cp = 1, microbatches = 1, micro_batch_size = 1;
  double tokens = 1;  // loss tokens of the global batch
};

struct FactorMatch {
  std::string expression;  // e.g. "1/dp", "M", "dp*M/cp"
  double value = 1.0;
  std::vector<std::string> alternatives;  // other expressions of equal simplicity with the same value
};

// The simplest product of mesh quantities (exponents -1, 0, +1; at most three factors; quantities
// equal to 1 are skipped as indistinguishable) within `rel_tol` of `scale`; nullopt when none.
std::optional<FactorMatch> attributeFactor(double scale, const MeshQuantities& mesh, double rel_tol);

// Fills c.diagnosis for an aux-gradient comparison that failed (c.ok == false): AUX_GRAD_MISSING
// (the mesh gradient is zero), AUX_GRAD_DIRECTION (cosine below 1 - direction_tol) or
// AUX_GRAD_SCALED with the attributed factor, cause and fix phrased for the preset.
void diagnoseAuxGradient(CheckResult& c, const MeshQuantities& mesh, const std::string& preset,
                         double mesh_norm, double reference_norm);

}  // namespace moe
