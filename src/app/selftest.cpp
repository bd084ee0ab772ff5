#include "app/selftest.hpp"

#include <chrono>
#include <cmath>

#include <fmt/format.h>

#include "app/tool_info.hpp"
#include "common/errors.hpp"
#include "scenario/catalog.hpp"

namespace moe {
namespace {

// A small two-layer router with unequal padding, large enough that every factor is visible.
// batch 15 = dp 3 x M 5 (micro-batch size 1), seq_len 8 (two CP chunks of 4).
Scenario baseScenario() {
  Scenario sc;
  sc.seed = 11;
  sc.model.hidden = 16;
  sc.model.experts = 6;
  sc.model.top_k = 2;
  sc.model.layers = 2;
  sc.model.ffn = 8;
  sc.data.batch = 15;
  sc.data.seq_len = 8;
  sc.data.valid_lengths = {8, 7, 8, 5, 8, 8, 6, 8, 3, 8, 8, 7, 8, 4, 8};
  sc.aux.coeff = 0.01;
  sc.mesh.dp = 3;
  sc.mesh.microbatches = 5;
  return sc;
}

std::string meshText(const SelftestMesh& m) {
  std::string text = fmt::format("dp={} cp={} M={}", m.dp, m.cp, m.microbatches);
  if (m.tp > 1) text += fmt::format(" tp={}", m.tp);
  if (m.ep > 1) text += fmt::format(" ep={}", m.ep);
  return text;
}

}  // namespace

std::vector<SelftestCase> selftestCases() {
  std::vector<SelftestCase> cases;
  for (const FaultRecord& record : faultCatalog()) {
    const SelftestMesh& spec = record.selftest;
    SelftestCase c;
    c.fault = record.id;
    Scenario sc = baseScenario();
    sc.framework.preset = spec.preset;
    sc.aux.type = spec.scope;
    sc.mesh.dp = spec.dp;
    sc.mesh.cp = spec.cp;
    sc.mesh.microbatches = spec.microbatches;
    sc.mesh.tp = spec.tp;
    sc.mesh.ep = spec.ep;
    sc.aux.z_loss_coeff = spec.z_loss_coeff;
    sc.aux.exclude_padding = spec.exclude_padding;
    if (!spec.padding) sc.data.valid_lengths.assign(sc.data.batch, sc.data.seq_len);
    // The exported files pin the weighting the preset resolves to (what the reference checks).
    sc = resolveScenario(sc);
    const char* preset = toString(spec.preset);
    c.fixed = sc;
    c.fixed.name = std::string(record.name) + "-fixed";
    c.fixed.description = fmt::format(
        "Fixed twin of {}: the same router, data and mesh ({}, preset {}, aux {}) without the fault; the aux "
        "gradient must match the reference. Source: {}.",
        record.name, meshText(spec), preset, toString(spec.scope), record.source);
    c.fixed.expect = Expectation{Verdict::kPass, DiagnosisCode::kNone, ""};
    c.buggy = sc;
    c.buggy.name = record.name;
    c.buggy.faults = {record.id};
    c.buggy.description = fmt::format(
        "Reproduces {}: {}. Preset {}, aux {}, mesh {}; expected signature {}{}.", record.source, record.summary,
        preset, toString(spec.scope), meshText(spec), toString(record.expected_diagnosis),
        std::string(record.expected_factor).empty() ? "" : std::string(" x ") + record.expected_factor);
    c.buggy.expect = Expectation{Verdict::kFail, record.expected_diagnosis, record.expected_factor};
    validateScenario(c.fixed);
    validateScenario(c.buggy);
    cases.push_back(c);
  }
  return cases;
}

Report runSelftest(MeshBackend& backend, const std::vector<Reporter*>& reporters,
                   const std::function<void(int, int, const std::string&)>& progress) {
  Report report;
  report.context.kind = ReportKind::kSelftest;
  report.context.tool = toolInfo();
  for (Reporter* r : reporters) r->reportContext(report.context);
  const std::vector<SelftestCase> cases = selftestCases();
  for (size_t i = 0; i < cases.size(); ++i) {
    const SelftestCase& c = cases[i];
    if (progress) progress(static_cast<int>(i), static_cast<int>(cases.size()), toString(c.fault));
    const auto t0 = std::chrono::steady_clock::now();
    const FaultRecord& record = faultRecord(c.fault);
    FaultCaseOutcome outcome;
    outcome.fault = c.fault;
    outcome.mesh = meshText(record.selftest) + " " + toString(c.buggy.framework.preset);
    outcome.expected_code = record.expected_diagnosis;
    outcome.expected_factor = record.expected_factor;
    const Report buggy = runChecks(c.buggy, backend).report;
    outcome.flagged = buggy.summary.expectation_met;
    CheckResult row;
    row.name = toString(c.fault);
    row.kind = CheckKind::kFaultCase;
    row.scale = NAN;
    for (const CheckResult& check : buggy.checks) {
      if (check.kind == CheckKind::kAuxGrad &&
          (std::isnan(row.scale) || std::fabs(check.scale - 1) > std::fabs(row.scale - 1)))
        row.scale = check.scale;
      if (!check.informational && !check.ok && outcome.measured_code == DiagnosisCode::kNone) {
        outcome.measured_code = check.diagnosis.code;
        outcome.measured_factor = check.diagnosis.factor;
      }
    }
    // Prefer the diagnosis that matches the expectation when several checks carry one.
    for (const CheckResult& check : buggy.checks)
      if (check.diagnosis.code == record.expected_diagnosis) {
        outcome.measured_code = check.diagnosis.code;
        outcome.measured_factor = check.diagnosis.factor;
      }
    outcome.twin_passes = runChecks(c.fixed, backend).report.summary.expectation_met;
    row.ok = outcome.flagged && outcome.twin_passes;
    row.fault_case = outcome;
    row.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    report.checks.push_back(row);
    for (Reporter* r : reporters) r->reportRows({row});
  }
  report.summary.verdict = verdictOf(report.checks);
  for (Reporter* r : reporters) r->finalize(report.summary);
  return report;
}

void exportSelftestScenarios(const std::string& directory) {
  for (const SelftestCase& c : selftestCases()) {
    writeFileAtomically(directory + "/" + c.buggy.name + ".json", scenarioToJsonText(c.buggy) + "\n");
    writeFileAtomically(directory + "/" + c.fixed.name + ".json", scenarioToJsonText(c.fixed) + "\n");
  }
}

}  // namespace moe
