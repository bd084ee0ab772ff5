// Names what is wrong when a mesh's (or a real job's) aux gradient differs from the reference:
// missing, scaled by a product of mesh quantities, turned, or non-linear in the coefficient.
#pragma once

#include <optional>
#include <string>
#include <vector>

#include "report/report.hpp"

namespace moe {

// The quantities a scale can be attributed to: the mesh sizes, the micro-batch size and the tokens.
struct MeshQuantities {
  MeshSizes sizes;            // dp, cp, M, pp (and tp, ep when > 1)
  int micro_batch_size = 1;   // sequences per (DP replica, microbatch)
  double tokens = 1;          // loss tokens of the global batch
  bool attribute_world = false;  // also try the world size (verify: the capture's rank count)
};

struct FactorMatch {
  std::string expression;  // e.g. "1/dp", "M", "dp*M/cp"
  double value = 1.0;
  std::vector<std::string> alternatives;  // other expressions of equal simplicity with the same value
};

// The simplest product of mesh quantities (exponents -1, 0, +1; at most three factors; quantities
// equal to 1 are skipped as indistinguishable) within `rel_tol` of `scale`; nullopt when none.
// Quantities in order: dp, cp, M, pp, mbs, tokens, tp, ep, world.
std::optional<FactorMatch> attributeFactor(double scale, const MeshQuantities& mesh, double rel_tol);

// Fills c.diagnosis for an aux-gradient comparison that failed (c.ok == false): AUX_GRAD_MISSING
// (the mesh gradient is zero), AUX_GRAD_DIRECTION (cosine below 1 - direction_tol, or the right scale
// with elements beyond tolerance) or AUX_GRAD_SCALED with the attributed factor (and its
// alternatives), its known cause and a fix phrased with `scale_knob` (the knob a fix changes).
void diagnoseAuxGradient(CheckResult& c, const MeshQuantities& mesh, const std::string& scale_knob,
                         double mesh_norm, double reference_norm);

}  // namespace moe
