#include "app/sweep.hpp"

#include <chrono>
#include <cmath>
#include <sstream>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "common/errors.hpp"
#include "report/reporters.hpp"

namespace moe {

bool SweepResult::passed() const {
  for (const SweepRow& r : rows)
    if (r.verdict != "pass") return false;
  return true;
}

namespace {

std::vector<int> divisorsOf(int n) {
  std::vector<int> d;
  for (int i = 1; i <= n; ++i)
    if (n % i == 0) d.push_back(i);
  return d;
}

SweepRow rowOf(const Report& report) {
  SweepRow row;
  row.mesh = report.mesh;
  row.verdict = report.verdict;
  row.worst_scale = 1.0;
  row.worst_cosine = 1.0;
  for (const CheckResult& c : report.checks) {
    if (c.name.rfind("aux_grad/layer", 0) == 0) {
      if (std::isnan(c.scale) || std::fabs(c.scale - 1.0) > std::fabs(row.worst_scale - 1.0) ||
          std::isnan(row.worst_scale))
        row.worst_scale = c.scale;
      if (!(c.cosine >= row.worst_cosine)) row.worst_cosine = c.cosine;
    }
    if (c.informational && !c.diagnosis.code.empty()) row.findings.push_back(c.diagnosis.code);
    if (!c.informational && !c.ok && row.failing_check.empty()) {
      row.failing_check = c.name;
      row.diagnosis = c.diagnosis;
    }
  }
  return row;
}

std::string meshLabel(const MeshSummary& m) {
  return fmt::format("dp={} pp={} cp={} M={}", m.dp, m.pp, m.cp, m.microbatches);
}

}  // namespace

SweepResult runSweep(const Scenario& base, const SweepOptions& options,
                     const std::function<void(int, int, const MeshConfig&)>& progress) {
  if (options.world < 1) throw UsageError("sweep: --world must be >= 1");
  SweepResult result;
  result.tool = toolInfo();
  result.scenario_json = scenarioToJsonText(base);
  result.scenario_file = base.source_file;
  result.world = options.world;
  std::vector<Scenario> layouts;
  for (int dp : divisorsOf(options.world))
    for (int pp : divisorsOf(options.world / dp)) {
      const int cp = options.world / (dp * pp);
      std::vector<int> microbatch_counts = {base.mesh.microbatches};
      if (options.all_microbatches && base.data.batch % dp == 0)
        microbatch_counts = divisorsOf(base.data.batch / dp);
      for (int m : microbatch_counts) {
        Scenario sc = base;
        sc.mesh.dp = dp;
        sc.mesh.pp = pp;
        sc.mesh.cp = cp;
        sc.mesh.microbatches = m;
        if (sc.mesh.schedule != Schedule::kInterleaved1F1B) sc.mesh.virtual_stages = 1;
        try {
          validateScenario(sc);
          layouts.push_back(sc);
        } catch (const InputError&) {
          ++result.skipped_layouts;  // e.g. layers not divisible by pp, seq_len by cp
        }
      }
    }
  if (layouts.empty())
    throw InputError(base.source_file, "/mesh",
                     fmt::format("no dp x pp x cp layout of world {} is valid for this scenario "
                                 "(batch {}, seq_len {}, layers {})",
                                 options.world, base.data.batch, base.data.seq_len, base.model.layers));
  for (size_t i = 0; i < layouts.size(); ++i) {
    if (progress) progress(static_cast<int>(i), static_cast<int>(layouts.size()), layouts[i].mesh);
    const auto t0 = std::chrono::steady_clock::now();
    const CheckRunOutput out = runChecks(layouts[i], options.run);
    SweepRow row = rowOf(out.report);
    row.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    result.rows.push_back(row);
  }
  return result;
}

std::string renderSweepConsole(const SweepResult& r) {
  std::ostringstream out;
  out << fmt::format("# moe-lbcheck sweep  world={}  scenario: {}\n", r.world, r.scenario_file);
  out << fmt::format("#  {:<24} {:>12} {:>14} {:>7}  {}\n", "layout", "aux scale", "aux cosine",
                     "result", "diagnosis");
  int failed = 0;
  for (const SweepRow& row : r.rows) {
    const bool ok = row.verdict == "pass";
    if (!ok) ++failed;
    std::string diagnosis = row.diagnosis.code;
    if (!row.diagnosis.factor.empty()) diagnosis += " factor=" + row.diagnosis.factor;
    if (!ok && !row.failing_check.empty()) diagnosis += " (" + row.failing_check + ")";
    for (const auto& f : row.findings) diagnosis += (diagnosis.empty() ? "" : "; ") + std::string("finding ") + f;
    out << fmt::format("   {:<24} {:>12.9g} {:>14.10f} {:>7}  {}\n", meshLabel(row.mesh), row.worst_scale,
                       row.worst_cosine, ok ? "OK" : "FAILED", diagnosis);
  }
  if (r.skipped_layouts > 0)
    out << fmt::format("# {} layouts of world {} skipped: the scenario does not allow them\n",
                       r.skipped_layouts, r.world);
  out << (failed == 0 ? fmt::format("# moe-lbcheck sweep: OK ({} layouts, 0 failed)\n", r.rows.size())
                      : fmt::format("# moe-lbcheck sweep: FAILED ({} of {} layouts failed)\n", failed,
                                    r.rows.size()));
  return out.str();
}

std::string renderSweepJson(const SweepResult& r) {
  using Json = nlohmann::ordered_json;
  auto num = [](double v) -> Json { return std::isfinite(v) ? Json(v) : Json(nullptr); };
  Json j;
  j["schema_version"] = 1;
  j["kind"] = "sweep";
  j["tool"] = {{"version", r.tool.version}, {"torch_version", r.tool.torch_version},
               {"features", r.tool.features}};
  j["scenario_file"] = r.scenario_file;
  j["scenario"] = Json::parse(r.scenario_json);
  j["world"] = r.world;
  j["verdict"] = r.passed() ? "pass" : "fail";
  j["skipped_layouts"] = r.skipped_layouts;
  Json rows = Json::array();
  for (const SweepRow& row : r.rows) {
    Json x;
    x["mesh"] = {{"dp", row.mesh.dp}, {"pp", row.mesh.pp}, {"cp", row.mesh.cp},
                 {"microbatches", row.mesh.microbatches}, {"world", row.mesh.world},
                 {"backend", row.mesh.backend}, {"schedule", row.mesh.schedule}};
    x["verdict"] = row.verdict;
    x["scale"] = num(row.worst_scale);
    x["cosine"] = num(row.worst_cosine);
    x["failing_check"] = row.failing_check;
    if (row.diagnosis.code.empty()) {
      x["diagnosis"] = nullptr;
    } else {
      x["diagnosis"] = {{"code", row.diagnosis.code}, {"factor", row.diagnosis.factor},
                        {"value", num(row.diagnosis.value)}, {"cause", row.diagnosis.cause},
                        {"fix", row.diagnosis.fix}};
    }
    x["findings"] = row.findings;
    x["seconds"] = row.seconds;
    rows.push_back(x);
  }
  j["rows"] = rows;
  return j.dump(2) + "\n";
}

std::string renderSweepJUnit(const SweepResult& r) {
  std::ostringstream out;
  int failures = 0;
  double total = 0;
  for (const SweepRow& row : r.rows) {
    if (row.verdict != "pass") ++failures;
    total += row.seconds;
  }
  out << "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n";
  out << fmt::format("<testsuites tests=\"{}\" failures=\"{}\" time=\"{:.3f}\">\n", r.rows.size(), failures, total);
  out << fmt::format("  <testsuite name=\"{}\" tests=\"{}\" failures=\"{}\" time=\"{:.3f}\">\n",
                     xmlEscape("sweep world=" + std::to_string(r.world) + " " + r.scenario_file, true),
                     r.rows.size(), failures, total);
  for (const SweepRow& row : r.rows) {
    out << fmt::format("    <testcase classname=\"moe-lbcheck.sweep\" name=\"{}\" time=\"{:.3f}\"",
                       xmlEscape(meshLabel(row.mesh), true), row.seconds);
    if (row.verdict == "pass") {
      out << "/>\n";
      continue;
    }
    const std::string message = fmt::format("{} {} scale={:.9g} cosine={:.10f}: {}", row.failing_check,
                                            row.diagnosis.code, row.worst_scale, row.worst_cosine,
                                            row.diagnosis.cause);
    out << ">\n      <failure type=\"" << xmlEscape(row.diagnosis.code, true) << "\" message=\""
        << xmlEscape(message, true) << "\">" << xmlEscape("fix: " + row.diagnosis.fix, false)
        << "</failure>\n    </testcase>\n";
  }
  out << "  </testsuite>\n</testsuites>\n";
  return out.str();
}

}  // namespace moe
