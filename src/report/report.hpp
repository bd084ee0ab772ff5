// What a run found, as plain structs (no torch, no JSON library in this header). The writers of
// reporters.hpp turn a Report into console text, JSON (schema_version 1, schema/report.schema.json)
// or JUnit XML.
#pragma once

#include <cstdint>
#include <limits>
#include <string>
#include <vector>

namespace moe {

// DESIGN §6 diagnosis codes.
namespace diag {
inline constexpr const char* kAuxGradMissing = "AUX_GRAD_MISSING";
inline constexpr const char* kAuxGradScaled = "AUX_GRAD_SCALED";
inline constexpr const char* kAuxGradDirection = "AUX_GRAD_DIRECTION";
inline constexpr const char* kAuxCoeffNonlinear = "AUX_COEFF_NONLINEAR";
inline constexpr const char* kMainGradMismatch = "MAIN_GRAD_MISMATCH";
inline constexpr const char* kObjectiveNotInvariant = "OBJECTIVE_NOT_INVARIANT";
inline constexpr const char* kFdUnreliable = "FD_UNRELIABLE";
}  // namespace diag

struct Diagnosis {
  std::string code;    // one of diag::*; empty = nothing to report
  std::string factor;  // attributed factor, e.g. "1/dp", "M", "0", or "unexplained"
  double value = std::numeric_limits<double>::quiet_NaN();  // the measured number behind it
  std::string cause;   // likely cause, in the words of the preset's knobs
  std::string fix;     // what to change
};

// One comparison of a mesh-produced quantity with the reference (nccl-tests style: elements and
// #wrong), or one informational finding.
struct CheckResult {
  std::string name;  // e.g. "aux_grad/layer1/router_weight"
  bool ok = true;
  bool informational = false;  // a finding that does not change the verdict
  double scale = std::numeric_limits<double>::quiet_NaN();   // <g, g_ref> / <g_ref, g_ref>
  double cosine = std::numeric_limits<double>::quiet_NaN();
  double max_abs_err = std::numeric_limits<double>::quiet_NaN();
  double max_rel_err = std::numeric_limits<double>::quiet_NaN();  // max|g-g_ref| / max|g_ref|
  double rtol = 0.0;
  double atol = 0.0;               // absolute slack from the reference's FD error estimate
  std::int64_t elements = 0;
  std::int64_t wrong = 0;          // elements with |g - g_ref| > atol + rtol * max|g_ref|
  std::string method;              // how the reference side was produced
  Diagnosis diagnosis;
};

struct ReferenceSummary {
  std::string method;
  double step = 0.0;               // the largest FD step used (logit units)
  double fd_error_estimate = 0.0;  // Richardson estimate, max over elements, absolute
  std::int64_t near_ties = 0;      // tokens whose top-k margin forced a smaller step or a frozen routing
  std::int64_t frozen_tokens = 0;  // tokens evaluated with the routing frozen
  std::int64_t empty_groups = 0;   // aux groups with no valid token, left out of their mean
  double aux_value = 0.0;          // J_aux (alpha included), summed over layers
  double z_value = 0.0;            // J_z (beta included)
  double main_value = 0.0;         // main objective
  double seconds = 0.0;
};

struct MeshSummary {
  int dp = 1, pp = 1, cp = 1, microbatches = 1, world = 1;
  std::string backend = "emulated";
  std::string schedule;
};

struct ToolInfo {
  std::string version;
  std::string torch_version;
  std::vector<std::string> features;  // e.g. "gloo", "cuda", "nccl"
};

struct Timing {
  double reference_s = 0.0;
  double mesh_s = 0.0;
  double total_s = 0.0;
};

struct Report {
  static constexpr int kSchemaVersion = 1;
  ToolInfo tool;
  std::string scenario_json;   // the resolved scenario (defaults filled in), as JSON text
  std::string scenario_file;
  MeshSummary mesh;
  std::string verdict;         // "pass" | "fail": did every non-informational check pass
  bool expectation_met = true; // does the outcome match the scenario's `expect`
  std::string expectation_detail;  // why not, when it does not
  std::vector<CheckResult> checks;
  ReferenceSummary reference;
  Timing timing;
};
}  // namespace moe
