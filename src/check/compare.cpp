#include "check/compare.hpp"

#include <algorithm>
#include <cmath>
#include <stdexcept>

namespace moe {

double dot(const std::vector<double>& a, const std::vector<double>& b) {
  long double s = 0;
  for (size_t i = 0; i < a.size(); ++i) s += static_cast<long double>(a[i]) * b[i];
  return static_cast<double>(s);
}

double norm2(const std::vector<double>& v) { return std::sqrt(dot(v, v)); }

CheckResult compareVectors(const std::string& name, const std::vector<double>& actual,
                           const std::vector<double>& reference, double rtol, double atol) {
  if (actual.size() != reference.size())
    throw std::logic_error("compareVectors(" + name + "): sizes differ");
  CheckResult c;
  c.name = name;
  c.rtol = rtol;
  c.atol = atol;
  c.elements = static_cast<std::int64_t>(reference.size());
  double max_ref = 0, max_err = 0;
  for (size_t i = 0; i < reference.size(); ++i) {
    max_ref = std::max(max_ref, std::fabs(reference[i]));
    max_err = std::max(max_err, std::fabs(actual[i] - reference[i]));
  }
  const double bound = atol + rtol * max_ref;
  for (size_t i = 0; i < reference.size(); ++i)
    if (!(std::fabs(actual[i] - reference[i]) <= bound)) ++c.wrong;  // NaN counts as wrong
  c.max_abs_err = max_err;
  c.max_rel_err = max_ref > 0 ? max_err / max_ref : (max_err > 0 ? INFINITY : 0.0);
  const double rr = dot(reference, reference), aa = dot(actual, actual), ar = dot(actual, reference);
  if (rr > 0) c.scale = ar / rr;
  if (rr > 0 && aa > 0) c.cosine = ar / std::sqrt(rr * aa);
  c.ok = c.wrong == 0;
  return c;
}

}  // namespace moe
