// What a run, a sweep, a selftest or a verify found, as plain typed structs (no torch, no JSON
// library in this header). The reporters of reporters.hpp write a Report as console text, JSON
// (schema_version 1, one schema file per kind in schema/) or JUnit XML.
#pragma once

#include <cstdint>
#include <limits>
#include <optional>
#include <string>
#include <vector>

#include "capture/capture.hpp"
#include "common/diagnosis_code.hpp"
#include "reference/reference_summary.hpp"
#include "scenario/catalog.hpp"
#include "scenario/scenario.hpp"

namespace moe {

enum class ReportKind { kRun, kSweep, kSelftest, kVerify };
const char* toString(ReportKind kind);  // "run", "sweep", "selftest", "verify"

// What a check compares.
enum class CheckKind {
  kAuxGrad,              // aux_grad/layer{l}/router_weight: the mesh's aux gradient vs the reference
  kMainGrad,             // main_grad/layer{l}/router_weight: the main-loss control
  kCoeffLinearity,       // aux_grad/coeff_linearity: the mesh at 2 alpha vs 2 x the mesh at alpha
  kDirectional,          // aux_grad/directional/{i} (informational)
  kObjectiveInvariance,  // objective/layout_invariance (informational)
  kObjectiveWeighting,   // objective/group_weighting (informational)
  kRoutingMargins,       // reference/routing_margins (informational)
  kReplicas,             // replicas/layer{l}: every rank holding a router ends with the same gradient
  kRouting,              // routing/layer{l} (informational, verify)
  kLayout,               // one layout of a sweep
  kFaultCase,            // one fault of the selftest
};

struct Diagnosis {
  DiagnosisCode code = DiagnosisCode::kNone;  // kNone = nothing to report
  std::string factor;  // attributed factor, e.g. "1/dp", "M", "0", or "unexplained"
  std::vector<std::string> factor_alternatives;  // equally simple products with the same value
  double value = std::numeric_limits<double>::quiet_NaN();  // the measured number behind it
  std::string cause;   // likely cause, in the words of the framework's knobs
  std::string fix;     // what to change
};

// The parallel layout a report is about.
struct MeshSummary {
  MeshSizes sizes;
  std::string backend = "emulated";
  std::string schedule;
};

// A selftest row: one fault, its expected and measured signature, its fixed twin.
struct FaultCaseOutcome {
  Fault fault = Fault::kDiscardApplyReturn;
  std::string mesh;  // "dp=3 cp=2 M=5 megatron"
  DiagnosisCode expected_code = DiagnosisCode::kNone;
  std::string expected_factor;
  DiagnosisCode measured_code = DiagnosisCode::kNone;
  std::string measured_factor;
  bool flagged = false;      // the buggy run met its expectation
  bool twin_passes = false;  // the fixed twin passed
};

// One row of a report: a comparison of a mesh-produced quantity with the reference (nccl-tests
// style: elements and #wrong), an informational finding, one layout of a sweep or one fault case of
// a selftest.
struct CheckResult {
  std::string name;  // e.g. "aux_grad/layer1/router_weight"
  CheckKind kind = CheckKind::kAuxGrad;
  int layer = -1;    // the global layer index, for per-layer checks
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
  // Sweep rows: the layout, the first failing check and the informational findings.
  std::optional<MeshSummary> layout;
  std::string failing_check;
  std::vector<DiagnosisCode> findings;
  // Selftest rows.
  std::optional<FaultCaseOutcome> fault_case;
  double seconds = std::numeric_limits<double>::quiet_NaN();
};

struct ToolInfo {
  std::string version;
  std::string torch_version;
  std::vector<std::string> features;  // e.g. "gloo", "cuda", "nccl"
};

// What a verify report says about the capture it judged.
struct CaptureSummary {
  std::string directory;
  // Rank 0's manifest: world_size, the mesh sizes under the manifest's own key names, the objective
  // (defaults filled in), framework and created_by. Its coordinates and layers are not reported.
  CaptureManifest manifest;
  std::int64_t tokens = 0;  // valid tokens of the global batch
  std::vector<int> layers;  // every layer of the capture
};

struct Timing {
  double reference_s = 0.0;
  double mesh_s = 0.0;   // run: the mesh runs
  double load_s = 0.0;   // verify: reading, checking and assembling the capture
  double total_s = 0.0;
};

// google/benchmark's ReportContext: what every row of the report shares.
struct ReportContext {
  ReportKind kind = ReportKind::kRun;
  ToolInfo tool;
  std::optional<Scenario> scenario;       // run, sweep: the resolved scenario
  std::optional<CaptureSummary> capture;  // verify
  std::optional<MeshSummary> mesh;        // run
  int world = 0;                          // sweep: the world size
  std::optional<OpenBugs> open_bugs;      // run with framework.open_bugs: applied and skipped
};

// What finalize() receives: the outcome of every row together.
struct ReportSummary {
  Verdict verdict = Verdict::kPass;
  bool expectation_met = true;     // does the outcome match the scenario's (or --expect's) expectation
  std::string expectation_detail;  // why not, when it does not
  std::optional<ReferenceSummary> reference;  // run, verify
  Timing timing;
  int skipped_layouts = 0;  // sweep: factorizations the scenario does not allow
};

struct Report {
  static constexpr int kSchemaVersion = 1;
  ReportContext context;
  std::vector<CheckResult> checks;
  ReportSummary summary;
};

// kPass when every non-informational row is ok.
Verdict verdictOf(const std::vector<CheckResult>& checks);

}  // namespace moe
