// The checker, kept apart from what it checks (nccl-tests style): compares a mesh-produced vector
// with its reference and counts the elements out of tolerance. No torch, no model code.
#pragma once

#include <string>
#include <vector>

#include "report/report.hpp"

namespace moe {

// scale = <a, r>/<r, r>, cosine, max_abs_err = max|a - r|, max_rel_err = max|a - r| / max|r|;
// an element is wrong when |a - r| > atol + rtol * max|r| (a norm-wise bound, so tiny reference
// elements do not produce spurious relative errors). ok = no element wrong. Sizes must match.
CheckResult compareVectors(const std::string& name, const std::vector<double>& actual,
                           const std::vector<double>& reference, double rtol, double atol);

// Euclidean norm and dot product (double accumulation).
double norm2(const std::vector<double>& v);
double dot(const std::vector<double>& a, const std::vector<double>& b);

}  // namespace moe
