#include "app/selftest.hpp"

#include <cmath>
#include <sstream>

#include <fmt/format.h>

#include "common/errors.hpp"
#include "report/reporters.hpp"
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

struct CaseSpec {
  const char* fault;
  const char* preset;
  AuxScope scope;
  int dp, cp, microbatches;
  bool padding;
};

// One case per catalog fault: the preset and mesh that make the signature observable.
const CaseSpec kCases[] = {
    {"discard_apply_return", "nemo_automodel", AuxScope::kMicroBatch, 3, 1, 5, true},
    {"missing_backward_scale", "nemo_automodel", AuxScope::kMicroBatch, 3, 2, 5, true},
    {"accumulation_overweight", "megatron", AuxScope::kMicroBatch, 3, 1, 5, true},
    {"global_token_normalization", "megatron", AuxScope::kGlobalBatch, 3, 1, 5, true},
    {"missing_cp_scale", "megatron", AuxScope::kMicroBatch, 3, 2, 5, true},
    {"seq_aux_missing_mbs", "megatron_per_token", AuxScope::kSequence, 1, 1, 5, false},
    {"count_padding", "megatron", AuxScope::kMicroBatch, 3, 1, 5, true},
    {"world_size_multiply", "hf_trainer", AuxScope::kMicroBatch, 3, 1, 5, true},
    {"autograd_allreduce_stats", "megatron", AuxScope::kMicroBatch, 3, 2, 5, true},
    {"stale_token_denominator", "megatron", AuxScope::kGlobalBatch, 3, 1, 5, true},
    {"batch_wise_counts_per_microbatch", "torchtitan", AuxScope::kGlobalBatch, 3, 1, 5, true},
    {"coeff_as_gate", "megatron", AuxScope::kMicroBatch, 3, 1, 5, true},
};

const char* scopeName(AuxScope s) { return toString(s); }

}  // namespace

std::vector<SelftestCase> selftestCases() {
  std::vector<SelftestCase> cases;
  for (const CaseSpec& spec : kCases) {
    const FaultInfo* info = findFault(spec.fault);
    if (!info) throw std::logic_error(std::string("selftest: fault not in catalog: ") + spec.fault);
    SelftestCase c;
    c.fault = spec.fault;
    Scenario sc = baseScenario();
    sc.framework.preset = spec.preset;
    sc.aux.type = spec.scope;
    sc.mesh.dp = spec.dp;
    sc.mesh.cp = spec.cp;
    sc.mesh.microbatches = spec.microbatches;
    if (!spec.padding) sc.data.valid_lengths.assign(sc.data.batch, sc.data.seq_len);
    const std::string mesh = fmt::format("dp={} cp={} M={}", spec.dp, spec.cp, spec.microbatches);
    c.fixed = sc;
    c.fixed.name = std::string(spec.fault) + "-fixed";
    c.fixed.description = fmt::format(
        "Fixed twin of {}: the same router, data and mesh ({}, preset {}, aux {}) without the fault; "
        "the aux gradient must match the reference. Source: {}.",
        spec.fault, mesh, spec.preset, scopeName(spec.scope), info->source);
    c.fixed.expect = Expectation{"pass", "", ""};
    c.buggy = sc;
    c.buggy.name = spec.fault;
    c.buggy.faults = {spec.fault};
    c.buggy.description = fmt::format(
        "Reproduces {}: {}. Preset {}, aux {}, mesh {}; expected signature {}{}.", info->source,
        info->summary, spec.preset, scopeName(spec.scope), mesh, info->expected_diagnosis,
        info->expected_factor.empty() ? "" : " x " + info->expected_factor);
    c.buggy.expect = Expectation{"fail", info->expected_diagnosis, info->expected_factor};
    validateScenario(c.fixed);
    validateScenario(c.buggy);
    cases.push_back(c);
  }
  return cases;
}

std::vector<SelftestRow> runSelftest(const CheckRunOptions& options,
                                     const std::function<void(int, int, const std::string&)>& progress) {
  std::vector<SelftestRow> rows;
  const std::vector<SelftestCase> cases = selftestCases();
  for (size_t i = 0; i < cases.size(); ++i) {
    const SelftestCase& c = cases[i];
    if (progress) progress(static_cast<int>(i), static_cast<int>(cases.size()), c.fault);
    SelftestRow row;
    row.fault = c.fault;
    row.mesh = fmt::format("dp={} cp={} M={} {}", c.buggy.mesh.dp, c.buggy.mesh.cp,
                           c.buggy.mesh.microbatches, c.buggy.framework.preset);
    row.expected = c.buggy.expect.diagnosis +
                   (c.buggy.expect.factor.empty() ? "" : " " + c.buggy.expect.factor);
    const Report buggy = runChecks(c.buggy, options).report;
    row.flagged = buggy.expectation_met;
    row.scale = NAN;
    for (const CheckResult& check : buggy.checks) {
      if (check.name.rfind("aux_grad/layer", 0) == 0 &&
          (std::isnan(row.scale) || std::fabs(check.scale - 1) > std::fabs(row.scale - 1)))
        row.scale = check.scale;
      if (!check.informational && !check.ok && row.measured.empty())
        row.measured = check.diagnosis.code +
                       (check.diagnosis.factor.empty() ? "" : " " + check.diagnosis.factor);
    }
    // Prefer the diagnosis that matches the expectation when several checks carry one.
    for (const CheckResult& check : buggy.checks)
      if (check.diagnosis.code == c.buggy.expect.diagnosis)
        row.measured = check.diagnosis.code +
                       (check.diagnosis.factor.empty() ? "" : " " + check.diagnosis.factor);
    if (row.measured.empty()) row.measured = "(none: passed)";
    row.twin_passes = runChecks(c.fixed, options).report.expectation_met;
    rows.push_back(row);
  }
  return rows;
}

std::string renderSelftestConsole(const std::vector<SelftestRow>& rows) {
  std::ostringstream out;
  out << fmt::format("#  {:<34} {:<34} {:<24} {:<24} {:>12}  {:<6} {}\n", "fault", "mesh", "expected",
                     "measured", "aux scale", "fixed", "result");
  int failed = 0;
  for (const SelftestRow& r : rows) {
    const bool ok = r.flagged && r.twin_passes;
    if (!ok) ++failed;
    out << fmt::format("   {:<34} {:<34} {:<24} {:<24} {:>12.6g}  {:<6} {}\n", r.fault, r.mesh, r.expected,
                       r.measured, r.scale, r.twin_passes ? "pass" : "FAIL", ok ? "FLAGGED" : "MISSED");
  }
  out << (failed == 0 ? fmt::format("# moe-lbcheck selftest: OK ({} faults flagged, {} fixed twins pass)\n",
                                    rows.size(), rows.size())
                      : fmt::format("# moe-lbcheck selftest: FAILED ({} of {} faults missed or twins failed)\n",
                                    failed, rows.size()));
  return out.str();
}

void exportSelftestScenarios(const std::string& directory) {
  for (const SelftestCase& c : selftestCases()) {
    writeFileAtomically(directory + "/" + c.buggy.name + ".json", scenarioToJsonText(c.buggy) + "\n");
    writeFileAtomically(directory + "/" + c.fixed.name + ".json", scenarioToJsonText(c.fixed) + "\n");
  }
}

}  // namespace moe
