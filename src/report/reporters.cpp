#include "report/reporters.hpp"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <sstream>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "common/errors.hpp"
#include "common/interrupt.hpp"
#include "common/json_input.hpp"

namespace moe {

const char* toString(ReportKind kind) {
  switch (kind) {
    case ReportKind::kRun: return "run";
    case ReportKind::kSweep: return "sweep";
    case ReportKind::kSelftest: return "selftest";
    case ReportKind::kVerify: return "verify";
  }
  return "run";
}

Verdict verdictOf(const std::vector<CheckResult>& checks) {
  for (const CheckResult& c : checks)
    if (!c.informational && !c.ok) return Verdict::kFail;
  return Verdict::kPass;
}

void writeReport(const Report& report, Reporter& reporter) {
  reporter.reportContext(report.context);
  reporter.reportRows(report.checks);
  reporter.finalize(report.summary);
}

namespace {

using ordered_json = nlohmann::ordered_json;

// ---------------------------------------------------------------- shared helpers

struct CheckCounts {
  int deciding = 0;       // rows that decide the verdict
  int failed = 0;         // deciding rows that are not ok
  int informational = 0;  // findings that do not change the verdict
};

CheckCounts countChecks(const std::vector<CheckResult>& checks) {
  CheckCounts counts;
  for (const CheckResult& check : checks) {
    if (check.informational) {
      ++counts.informational;
    } else {
      ++counts.deciding;
      if (!check.ok) ++counts.failed;
    }
  }
  return counts;
}

const char* resultWord(const CheckResult& check) {
  if (check.informational) return "INFO";
  return check.ok ? "OK" : "FAILED";
}

// %.6g-style number; NaN as "-".
std::string formatGeneral(double value, int precision = 6) {
  if (std::isnan(value)) return "-";
  if (std::isinf(value)) return value > 0 ? "inf" : "-inf";
  return fmt::format("{:.{}g}", value, precision);
}

// Scientific number for errors and tolerances; NaN as "-".
std::string formatScientific(double value, int precision = 3) {
  if (std::isnan(value)) return "-";
  if (std::isinf(value)) return value > 0 ? "inf" : "-inf";
  return fmt::format("{:.{}e}", value, precision);
}

// Cosine with enough digits to tell 0.999999999 from 1.
std::string formatCosine(double value) {
  if (std::isnan(value)) return "-";
  return fmt::format("{:.10g}", value);
}

std::string formatSeconds(double value) {
  if (std::isnan(value)) return "-";
  return fmt::format("{:.3f}", value);
}

std::string codeAndFactor(DiagnosisCode code, const std::string& factor) {
  std::string text = toString(code);
  if (!factor.empty()) text += (text.empty() ? "" : " ") + factor;
  return text;
}

// "CODE factor=F value=V: cause; fix: fix" (empty parts left out).
std::string describeDiagnosis(const Diagnosis& d) {
  std::string text = toString(d.code);
  if (!d.factor.empty()) text += " factor=" + d.factor;
  if (!std::isnan(d.value)) text += " value=" + formatGeneral(d.value, 9);
  if (!d.cause.empty()) text += ": " + d.cause;
  if (!d.fix.empty()) text += (d.cause.empty() ? ": fix: " : "; fix: ") + d.fix;
  return text;
}

std::string describeMesh(const MeshSummary& m) {
  const MeshSizes& s = m.sizes;
  std::string text = fmt::format("dp={} pp={} cp={} M={}", s.dp, s.pp, s.cp, s.microbatches);
  if (s.tp > 1) text += fmt::format(" tp={}", s.tp);
  if (s.ep > 1) text += fmt::format(" ep={}", s.ep);
  text += fmt::format(" world={} backend={}", s.world(), m.backend);
  if (!m.schedule.empty()) text += " schedule=" + m.schedule;
  return text;
}

std::string subjectName(const ReportContext& context) {
  if (context.scenario && !context.scenario->name.empty()) return context.scenario->name;
  if (context.capture) return context.capture->directory;
  return "unnamed";
}

const char* footerLabel(ReportKind kind) {
  switch (kind) {
    case ReportKind::kSweep: return "# moe-lbcheck sweep: ";
    case ReportKind::kSelftest: return "# moe-lbcheck selftest: ";
    default: return "# moe-lbcheck: ";
  }
}

// A scenario (or a capture's objective) that reproduces a bug expects its checks to fail: when they
// fail as expected the run exits 0, so a dashboard must not show red either.
bool failsAsExpected(const ReportSummary& s) { return s.expectation_met && s.verdict == Verdict::kFail; }

std::string numberText(double v) { return json_input::numberText(v); }

// ---------------------------------------------------------------- console rows

struct TableLayout {
  std::size_t name_width = 5;
};

void writeCheckHeader(std::ostream& out, const TableLayout& layout) {
  out << fmt::format("#  {:<{}}  {:>12}  {:>13}  {:>11}  {:>11}  {:>9}  {:>15}  {}\n", "check",
                     layout.name_width, "scale", "cosine", "max_abs_err", "max_rel_err", "rtol",
                     "#wrong/elements", "result");
}

void writeCheckRow(std::ostream& out, const TableLayout& layout, const CheckResult& c) {
  const std::string wrong = fmt::format("{}/{}", c.wrong, c.elements);
  out << fmt::format("   {:<{}}  {:>12}  {:>13}  {:>11}  {:>11}  {:>9}  {:>15}  {}\n", c.name, layout.name_width,
                     formatGeneral(c.scale), formatCosine(c.cosine), formatScientific(c.max_abs_err),
                     formatScientific(c.max_rel_err), formatScientific(c.rtol, 1), wrong, resultWord(c));
  if (c.diagnosis.code != DiagnosisCode::kNone) out << "     -> " << describeDiagnosis(c.diagnosis) << "\n";
}

void writeLayoutHeader(std::ostream& out) {
  out << fmt::format("#  {:<32} {:>12} {:>14} {:>7}  {}\n", "layout", "aux scale", "aux cosine", "result",
                     "diagnosis");
}

void writeLayoutRow(std::ostream& out, const CheckResult& row) {
  std::string diagnosis = toString(row.diagnosis.code);
  if (!row.diagnosis.factor.empty()) diagnosis += " factor=" + row.diagnosis.factor;
  if (!row.ok && !row.failing_check.empty()) diagnosis += " (" + row.failing_check + ")";
  for (DiagnosisCode f : row.findings)
    diagnosis += (diagnosis.empty() ? "" : "; ") + std::string("finding ") + toString(f);
  out << fmt::format("   {:<32} {:>12.9g} {:>14.10f} {:>7}  {}\n", row.name, row.scale, row.cosine,
                     row.ok ? "OK" : "FAILED", diagnosis);
}

void writeFaultHeader(std::ostream& out) {
  out << fmt::format("#  {:<38} {:<40} {:<26} {:<26} {:>12}  {:<6} {}\n", "fault", "mesh", "expected", "measured",
                     "aux scale", "fixed", "result");
}

void writeFaultRow(std::ostream& out, const CheckResult& row) {
  const FaultCaseOutcome& f = *row.fault_case;
  std::string measured = codeAndFactor(f.measured_code, f.measured_factor);
  if (measured.empty()) measured = "(none: passed)";
  out << fmt::format("   {:<38} {:<40} {:<26} {:<26} {:>12.6g}  {:<6} {}\n", row.name, f.mesh,
                     codeAndFactor(f.expected_code, f.expected_factor), measured, row.scale,
                     f.twin_passes ? "pass" : "FAIL", row.ok ? "FLAGGED" : "MISSED");
}

}  // namespace

// ---------------------------------------------------------------- console

ConsoleReporter::ConsoleReporter(std::ostream& out, ConsoleOptions options)
    : CollectingReporter(out), options_(options) {}

void ConsoleReporter::reportContext(const ReportContext& context) {
  context_ = context;
  if (options_.quiet) return;
  std::ostream& out = out_;
  if (context.kind == ReportKind::kSweep) {
    out << fmt::format("# moe-lbcheck sweep  world={}  scenario: {}\n", context.world,
                       context.scenario ? context.scenario->source_file : std::string());
    return;
  }
  if (context.kind == ReportKind::kSelftest) return;
  std::string tool_line = "# moe-lbcheck " + (context.tool.version.empty() ? "?" : context.tool.version);
  if (!context.tool.torch_version.empty()) tool_line += "  torch " + context.tool.torch_version;
  if (!context.tool.features.empty()) {
    std::string features;
    for (const std::string& f : context.tool.features) features += (features.empty() ? "" : ",") + f;
    tool_line += "  features: " + features;
  }
  out << tool_line << "\n";
  if (context.scenario) {
    const Scenario& sc = *context.scenario;
    out << "# scenario: " << (sc.name.empty() ? "unnamed" : sc.name);
    if (!sc.source_file.empty()) out << "  (" << sc.source_file << ")";
    out << "\n";
  }
  if (context.mesh) out << "# mesh: " << describeMesh(*context.mesh) << "\n";
  if (context.scenario) {
    const Scenario& sc = *context.scenario;
    std::string setup = std::string("# preset: ") + toString(sc.framework.preset);
    if (!sc.faults.empty()) {
      std::string faults;
      for (Fault f : sc.faults) faults += (faults.empty() ? "" : ",") + std::string(toString(f));
      setup += "  faults: " + faults;
    }
    setup += std::string("  aux: ") + toString(sc.aux.type) + " coeff=" + numberText(sc.aux.coeff) +
             " z_loss_coeff=" + numberText(sc.aux.z_loss_coeff);
    setup += std::string("  dtype: ") + toString(sc.model.dtype);
    out << setup << "\n";
  }
  if (context.open_bugs) {
    std::string applied, skipped;
    for (Fault f : context.open_bugs->applied) applied += (applied.empty() ? "" : ", ") + std::string(toString(f));
    for (const auto& [f, why] : context.open_bugs->skipped)
      skipped += (skipped.empty() ? "" : "; ") + std::string(toString(f)) + " (" + why + ")";
    out << "# open bugs of the preset: applied " << (applied.empty() ? "none" : applied) << "; skipped "
        << (skipped.empty() ? "none" : skipped) << "\n";
  }
  if (context.capture) {
    const CaptureSummary& c = *context.capture;
    out << "# capture: " << c.directory << "  (" << c.manifest.world_size << " rank files";
    if (!c.manifest.framework.empty()) out << "; framework: " << c.manifest.framework;
    out << ")\n";
    const CaptureMesh& m = c.manifest.mesh;
    out << fmt::format("# mesh: dp_size={} cp_size={} pp_size={} tp_size={} ep_size={} microbatches={} world={}\n",
                       m.dp_size, m.cp_size, m.pp_size, m.tp_size, m.ep_size, m.microbatches, c.manifest.world_size);
    const CaptureObjective& o = c.manifest.objective;
    out << fmt::format(
        "# objective: aux {} coeff={} z_loss_coeff={} z_loss_scope={} top_k={} score={}{} "
        "group_weighting={} exclude_padding={} compute_dtype={}  tokens: {}\n",
        toString(o.aux_scope), numberText(o.aux_coeff), numberText(o.z_coeff), toString(o.z_scope), o.top_k,
        toString(o.score), o.norm_topk_prob ? " norm_topk_prob" : "", toString(o.group_weighting),
        o.exclude_padding ? "true" : "false", toString(o.compute_dtype), c.tokens);
  }
  out << "#\n";
}

void ConsoleReporter::reportRows(const std::vector<CheckResult>& rows) {
  CollectingReporter::reportRows(rows);
  std::ostream& out = out_;
  switch (context_.kind) {
    case ReportKind::kSweep:
    case ReportKind::kSelftest:
      // Rows stream as they come (one per layout or fault), with the header once.
      for (const CheckResult& row : rows) {
        if (options_.quiet && row.ok) continue;
        if (!header_written_) {
          if (context_.kind == ReportKind::kSweep) writeLayoutHeader(out);
          else writeFaultHeader(out);
          header_written_ = true;
        }
        if (context_.kind == ReportKind::kSweep) writeLayoutRow(out, row);
        else writeFaultRow(out, row);
      }
      return;
    default: {
      TableLayout layout;
      for (const CheckResult& c : rows) layout.name_width = std::max(layout.name_width, c.name.size());
      for (const CheckResult& c : rows) {
        if (options_.quiet && (c.informational || c.ok)) continue;
        if (!header_written_) writeCheckHeader(out, layout);
        header_written_ = true;
        writeCheckRow(out, layout, c);
      }
    }
  }
}

void ConsoleReporter::finalize(const ReportSummary& summary) {
  std::ostream& out = out_;
  const CheckCounts counts = countChecks(rows_);
  const bool pass = summary.verdict == Verdict::kPass;
  const ReportKind kind = context_.kind;
  if (kind == ReportKind::kSweep) {
    if (summary.skipped_layouts > 0)
      out << fmt::format("# {} layouts of world {} skipped: the scenario does not allow them\n",
                         summary.skipped_layouts, context_.world);
    out << footerLabel(kind)
        << (pass ? fmt::format("OK ({} layouts, 0 failed)\n", counts.deciding)
                 : fmt::format("FAILED ({} of {} layouts failed)\n", counts.failed, counts.deciding));
    return;
  }
  if (kind == ReportKind::kSelftest) {
    out << footerLabel(kind)
        << (pass ? fmt::format("OK ({} faults flagged, {} fixed twins pass)\n", counts.deciding, counts.deciding)
                 : fmt::format("FAILED ({} of {} faults missed or twins failed)\n", counts.failed,
                               counts.deciding));
    return;
  }
  if (!options_.quiet) {
    out << "#\n";
    if (summary.reference) {
      const ReferenceSummary& r = *summary.reference;
      out << "# reference: method=" << (r.method.empty() ? "-" : r.method)
          << ", step=" << formatScientific(r.max_step, 2)
          << ", fd error estimate=" << formatScientific(r.fd_error_estimate, 2) << ", near-ties=" << r.near_ties
          << ", frozen=" << r.frozen_elements << ", empty groups=" << r.empty_groups << "\n";
      out << "# objective: aux=" << formatGeneral(r.aux_value, 9) << " z=" << formatGeneral(r.z_value, 9);
      if (kind == ReportKind::kRun) out << " main=" << formatGeneral(r.main_value, 9);
      out << "\n";
    }
    out << "# timing: reference " << formatSeconds(summary.timing.reference_s)
        << (kind == ReportKind::kVerify ? " s, capture load " : " s, mesh ")
        << formatSeconds(kind == ReportKind::kVerify ? summary.timing.load_s : summary.timing.mesh_s)
        << " s, total " << formatSeconds(summary.timing.total_s) << " s\n";
  }
  std::string line = pass ? fmt::format("OK ({} checks, {} failed", counts.deciding, counts.failed)
                          : fmt::format("FAILED ({} of {} checks failed", counts.failed, counts.deciding);
  if (counts.informational > 0) line += fmt::format(", {} informational", counts.informational);
  out << footerLabel(kind) << line << ")\n";
  out << "# expectation: " << (summary.expectation_met ? "met" : "not met");
  if (!summary.expectation_detail.empty()) out << " (" << summary.expectation_detail << ")";
  out << "\n";
}

// ---------------------------------------------------------------- JSON

namespace {

ordered_json numberOrNull(double value) {
  if (!std::isfinite(value)) return nullptr;
  return value;
}

ordered_json diagnosisJson(const Diagnosis& d) {
  if (d.code == DiagnosisCode::kNone) return nullptr;
  ordered_json j;
  j["code"] = toString(d.code);
  j["factor"] = d.factor;
  j["factor_alternatives"] = d.factor_alternatives;
  j["value"] = numberOrNull(d.value);
  j["cause"] = d.cause;
  j["fix"] = d.fix;
  return j;
}

ordered_json checkJson(const CheckResult& c) {
  ordered_json j;
  j["name"] = c.name;
  j["ok"] = c.ok;
  j["informational"] = c.informational;
  j["scale"] = numberOrNull(c.scale);
  j["cosine"] = numberOrNull(c.cosine);
  j["max_abs_err"] = numberOrNull(c.max_abs_err);
  j["max_rel_err"] = numberOrNull(c.max_rel_err);
  j["rtol"] = numberOrNull(c.rtol);
  j["atol"] = numberOrNull(c.atol);
  j["elements"] = c.elements;
  j["wrong"] = c.wrong;
  j["method"] = c.method;
  j["diagnosis"] = diagnosisJson(c.diagnosis);
  return j;
}

ordered_json toolJson(const ToolInfo& t) {
  ordered_json tool;
  tool["version"] = t.version;
  tool["torch_version"] = t.torch_version;
  tool["features"] = t.features;
  return tool;
}

ordered_json meshJson(const MeshSummary& m) {
  ordered_json mesh;
  mesh["dp"] = m.sizes.dp;
  mesh["pp"] = m.sizes.pp;
  mesh["cp"] = m.sizes.cp;
  mesh["tp"] = m.sizes.tp;
  mesh["ep"] = m.sizes.ep;
  mesh["microbatches"] = m.sizes.microbatches;
  mesh["world"] = m.sizes.world();
  mesh["backend"] = m.backend;
  mesh["schedule"] = m.schedule;
  return mesh;
}

ordered_json scenarioJson(const Scenario& sc) {
  try {
    return ordered_json::parse(scenarioToJsonText(sc, -1));
  } catch (const nlohmann::json::exception& e) {
    throw RuntimeFailure(std::string("report: the resolved scenario is not valid JSON: ") + e.what());
  }
}

ordered_json referenceJson(const ReferenceSummary& r) {
  ordered_json reference;
  reference["method"] = r.method;
  reference["step"] = numberOrNull(r.max_step);
  reference["fd_error_estimate"] = numberOrNull(r.fd_error_estimate);
  reference["near_ties"] = r.near_ties;
  reference["frozen_tokens"] = r.frozen_elements;
  reference["empty_groups"] = r.empty_groups;
  reference["aux_value"] = numberOrNull(r.aux_value);
  reference["z_value"] = numberOrNull(r.z_value);
  reference["main_value"] = numberOrNull(r.main_value);
  reference["seconds"] = numberOrNull(r.seconds);
  return reference;
}

ordered_json captureJson(const CaptureSummary& c) {
  ordered_json j;
  j["directory"] = c.directory;
  j["world_size"] = c.manifest.world_size;
  const CaptureMesh& m = c.manifest.mesh;
  j["mesh"] = {{"dp_size", m.dp_size}, {"cp_size", m.cp_size}, {"pp_size", m.pp_size},
               {"tp_size", m.tp_size}, {"ep_size", m.ep_size}, {"microbatches", m.microbatches}};
  const CaptureObjective& o = c.manifest.objective;
  j["objective"] = {{"aux_type", toString(o.aux_scope)},
                    {"coeff", o.aux_coeff},
                    {"z_loss_coeff", o.z_coeff},
                    {"z_loss_scope", toString(o.z_scope)},
                    {"top_k", o.top_k},
                    {"score", toString(o.score)},
                    {"norm_topk_prob", o.norm_topk_prob},
                    {"exclude_padding", o.exclude_padding},
                    {"group_weighting", toString(o.group_weighting)},
                    {"compute_dtype", toString(o.compute_dtype)}};
  j["framework"] = c.manifest.framework;
  j["created_by"] = c.manifest.created_by;
  j["layers"] = c.layers;
  j["tokens"] = c.tokens;
  return j;
}

ordered_json layoutJson(const CheckResult& row) {
  ordered_json x;
  const MeshSummary& m = row.layout ? *row.layout : MeshSummary{};
  x["mesh"] = meshJson(m);
  x["verdict"] = row.ok ? "pass" : "fail";
  x["scale"] = numberOrNull(row.scale);
  x["cosine"] = numberOrNull(row.cosine);
  x["failing_check"] = row.failing_check;
  x["diagnosis"] = diagnosisJson(row.diagnosis);
  ordered_json findings = ordered_json::array();
  for (DiagnosisCode f : row.findings) findings.push_back(toString(f));
  x["findings"] = findings;
  x["seconds"] = numberOrNull(row.seconds);
  return x;
}

ordered_json faultCaseJson(const CheckResult& row) {
  const FaultCaseOutcome& f = *row.fault_case;
  ordered_json x;
  x["fault"] = toString(f.fault);
  x["mesh"] = f.mesh;
  x["expected"] = {{"code", toString(f.expected_code)}, {"factor", f.expected_factor}};
  x["measured"] = {{"code", toString(f.measured_code)}, {"factor", f.measured_factor}};
  x["scale"] = numberOrNull(row.scale);
  x["flagged"] = f.flagged;
  x["twin_passes"] = f.twin_passes;
  x["ok"] = row.ok;
  x["seconds"] = numberOrNull(row.seconds);
  return x;
}

}  // namespace

void JsonReporter::finalize(const ReportSummary& summary) {
  const ReportContext& c = context_;
  ordered_json j;
  j["schema_version"] = Report::kSchemaVersion;
  j["kind"] = toString(c.kind);
  j["tool"] = toolJson(c.tool);
  switch (c.kind) {
    case ReportKind::kRun:
    case ReportKind::kVerify: {
      if (c.kind == ReportKind::kRun) {
        j["scenario_file"] = c.scenario ? c.scenario->source_file : std::string();
        j["scenario"] = c.scenario ? scenarioJson(*c.scenario) : ordered_json::object();
        j["mesh"] = meshJson(c.mesh ? *c.mesh : MeshSummary{});
        ordered_json bugs;
        bugs["enabled"] = c.open_bugs.has_value();
        ordered_json applied = ordered_json::array(), skipped = ordered_json::array();
        if (c.open_bugs) {
          for (Fault f : c.open_bugs->applied) applied.push_back(toString(f));
          for (const auto& [f, why] : c.open_bugs->skipped) skipped.push_back({{"fault", toString(f)}, {"reason", why}});
        }
        bugs["applied"] = applied;
        bugs["skipped"] = skipped;
        j["open_bugs"] = bugs;
      } else {
        j["capture"] = captureJson(c.capture ? *c.capture : CaptureSummary{});
      }
      j["verdict"] = toString(summary.verdict);
      j["expectation_met"] = summary.expectation_met;
      j["expectation_detail"] = summary.expectation_detail;
      ordered_json checks = ordered_json::array();
      for (const CheckResult& row : rows_) checks.push_back(checkJson(row));
      j["checks"] = checks;
      j["reference"] = referenceJson(summary.reference ? *summary.reference : ReferenceSummary{});
      ordered_json timing;
      timing["reference_s"] = numberOrNull(summary.timing.reference_s);
      if (c.kind == ReportKind::kRun) timing["mesh_s"] = numberOrNull(summary.timing.mesh_s);
      else timing["load_s"] = numberOrNull(summary.timing.load_s);
      timing["total_s"] = numberOrNull(summary.timing.total_s);
      j["timing"] = timing;
      break;
    }
    case ReportKind::kSweep: {
      j["scenario_file"] = c.scenario ? c.scenario->source_file : std::string();
      j["scenario"] = c.scenario ? scenarioJson(*c.scenario) : ordered_json::object();
      j["world"] = c.world;
      j["verdict"] = toString(summary.verdict);
      j["skipped_layouts"] = summary.skipped_layouts;
      ordered_json rows = ordered_json::array();
      for (const CheckResult& row : rows_) rows.push_back(layoutJson(row));
      j["rows"] = rows;
      break;
    }
    case ReportKind::kSelftest: {
      j["verdict"] = toString(summary.verdict);
      ordered_json rows = ordered_json::array();
      for (const CheckResult& row : rows_)
        if (row.fault_case) rows.push_back(faultCaseJson(row));
      j["rows"] = rows;
      break;
    }
  }
  // error_handler::replace: a non-UTF-8 byte in a name or message must not abort the report.
  out_ << j.dump(options_.indent, ' ', false, nlohmann::json::error_handler_t::replace) << "\n";
}

// ---------------------------------------------------------------- JUnit

std::string xmlEscape(const std::string& text, bool attribute) {
  std::string escaped;
  escaped.reserve(text.size());
  for (char ch : text) {
    const auto byte = static_cast<unsigned char>(ch);
    switch (ch) {
      case '&': escaped += "&amp;"; break;
      case '<': escaped += "&lt;"; break;
      case '>': escaped += "&gt;"; break;
      case '"': escaped += "&quot;"; break;
      case '\'': escaped += "&apos;"; break;
      case '\n': escaped += attribute ? "&#10;" : "\n"; break;
      case '\r': escaped += "&#13;"; break;
      case '\t': escaped += attribute ? "&#9;" : "\t"; break;
      default: escaped += byte < 0x20 || byte == 0x7f ? '?' : ch;
    }
  }
  return escaped;
}

namespace {

std::string attr(const std::string& text) { return xmlEscape(text, true); }
std::string text(const std::string& text) { return xmlEscape(text, false); }

std::string checkSummary(const CheckResult& c) {
  std::string summary;
  if (c.fault_case) {
    const FaultCaseOutcome& f = *c.fault_case;
    summary = fmt::format("expected {} measured {} (aux scale {}); fixed twin {}",
                          codeAndFactor(f.expected_code, f.expected_factor),
                          codeAndFactor(f.measured_code, f.measured_factor), formatGeneral(c.scale),
                          f.twin_passes ? "passes" : "FAILS");
    return summary;
  }
  if (c.layout) {
    summary = fmt::format("{} {} scale={:.9g} cosine={:.10f}", c.failing_check, toString(c.diagnosis.code), c.scale,
                          c.cosine);
    if (!c.diagnosis.cause.empty()) summary += ": " + c.diagnosis.cause;
    return summary;
  }
  summary = fmt::format("scale={} cosine={} max_abs_err={} max_rel_err={} rtol={} wrong={}/{}", formatGeneral(c.scale),
                        formatCosine(c.cosine), formatScientific(c.max_abs_err), formatScientific(c.max_rel_err),
                        formatScientific(c.rtol, 1), c.wrong, c.elements);
  if (c.diagnosis.code != DiagnosisCode::kNone) summary += "; " + describeDiagnosis(c.diagnosis);
  return summary;
}

void writeProperty(std::ostream& out, const std::string& name, const std::string& value) {
  out << "      <property name=\"" << attr(name) << "\" value=\"" << attr(value) << "\"/>\n";
}

}  // namespace

void JUnitReporter::finalize(const ReportSummary& summary) {
  std::ostream& out = out_;
  const ReportContext& c = context_;
  const CheckCounts counts = countChecks(rows_);
  const std::size_t tests = rows_.size();
  double seconds = std::isfinite(summary.timing.total_s) ? summary.timing.total_s : 0.0;
  if (c.kind == ReportKind::kSweep || c.kind == ReportKind::kSelftest) {
    seconds = 0.0;
    for (const CheckResult& row : rows_) seconds += std::isfinite(row.seconds) ? row.seconds : 0.0;
  }
  const std::string time = formatSeconds(seconds);
  const bool expected_failure =
      (c.kind == ReportKind::kRun || c.kind == ReportKind::kVerify) && failsAsExpected(summary);
  const int failures = expected_failure ? 0 : counts.failed;
  const int skipped = expected_failure ? counts.failed : 0;
  std::string suite_name;
  std::string classname;
  switch (c.kind) {
    case ReportKind::kSweep:
      suite_name = "sweep world=" + std::to_string(c.world) + " " + (c.scenario ? c.scenario->source_file : "");
      classname = "moe-lbcheck.sweep";
      break;
    case ReportKind::kSelftest:
      suite_name = "selftest";
      classname = "moe-lbcheck.selftest";
      break;
    case ReportKind::kVerify:
      suite_name = subjectName(c);
      classname = "moe-lbcheck.verify";
      break;
    case ReportKind::kRun:
      suite_name = subjectName(c);
      classname = "moe-lbcheck." + suite_name;
      break;
  }

  out << "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n";
  out << "<testsuites name=\"moe-lbcheck\" tests=\"" << tests << "\" failures=\"" << failures
      << "\" errors=\"0\" time=\"" << time << "\">\n";
  out << "  <testsuite name=\"" << attr(suite_name) << "\" tests=\"" << tests << "\" failures=\"" << failures
      << "\" errors=\"0\" skipped=\"" << skipped << "\" time=\"" << time << "\">\n";

  out << "    <properties>\n";
  writeProperty(out, "kind", toString(c.kind));
  if (c.scenario) {
    writeProperty(out, "scenario_file", c.scenario->source_file);
    writeProperty(out, "preset", toString(c.scenario->framework.preset));
  }
  if (c.mesh) writeProperty(out, "mesh", describeMesh(*c.mesh));
  if (c.capture) writeProperty(out, "capture", c.capture->directory);
  writeProperty(out, "verdict", toString(summary.verdict));
  if (c.kind == ReportKind::kRun || c.kind == ReportKind::kVerify) {
    writeProperty(out, "expectation_met", summary.expectation_met ? "true" : "false");
    writeProperty(out, "expectation_detail", summary.expectation_detail);
  }
  if (summary.reference) {
    writeProperty(out, "reference_method", summary.reference->method);
    writeProperty(out, "fd_error_estimate", formatScientific(summary.reference->fd_error_estimate, 2));
    writeProperty(out, "near_ties", std::to_string(summary.reference->near_ties));
  }
  writeProperty(out, "tool_version", c.tool.version);
  out << "    </properties>\n";

  for (const CheckResult& row : rows_) {
    out << "    <testcase name=\"" << attr(row.name) << "\" classname=\"" << attr(classname) << "\" time=\""
        << formatSeconds(std::isfinite(row.seconds) ? row.seconds : 0.0) << "\"";
    if (row.ok && !row.informational) {
      out << "/>\n";
      continue;
    }
    const std::string summary_text = checkSummary(row);
    out << ">\n";
    if (!row.informational && !row.ok && expected_failure) {
      out << "      <skipped message=\""
          << attr("expected failure (the scenario reproduces a bug): " + summary_text) << "\"/>\n";
    } else if (!row.informational && !row.ok) {
      const std::string type =
          row.diagnosis.code == DiagnosisCode::kNone ? std::string("CHECK_FAILED") : toString(row.diagnosis.code);
      out << "      <failure message=\"" << attr(summary_text) << "\" type=\"" << attr(type) << "\">"
          << text(summary_text);
      if (!row.diagnosis.fix.empty() && (row.layout || row.fault_case)) out << text("\nfix: " + row.diagnosis.fix);
      if (!row.method.empty()) out << text("\nreference method: " + row.method);
      out << "</failure>\n";
    } else {
      out << "      <system-out>" << text("INFO " + summary_text) << "</system-out>\n";
    }
    out << "    </testcase>\n";
  }
  out << "  </testsuite>\n</testsuites>\n";
}

// ---------------------------------------------------------------- common entry points

std::string renderReport(const Report& report, ReportFormat format, ConsoleOptions console) {
  std::ostringstream out;
  switch (format) {
    case ReportFormat::kConsole: {
      ConsoleReporter r(out, console);
      writeReport(report, r);
      break;
    }
    case ReportFormat::kJson: {
      JsonReporter r(out);
      writeReport(report, r);
      break;
    }
    case ReportFormat::kJUnit: {
      JUnitReporter r(out);
      writeReport(report, r);
      break;
    }
  }
  return out.str();
}

void writeFileAtomically(const std::string& path, const std::string& content) {
  namespace fs = std::filesystem;
  auto fail = [&](const std::string& what, int error_number) -> RuntimeFailure {
    return RuntimeFailure("cannot write " + path + ": " + what + ": " + std::strerror(error_number));
  };
  if (path.empty()) throw RuntimeFailure("cannot write a file with an empty path");
  const fs::path target(path);
  const fs::path directory = target.has_parent_path() ? target.parent_path() : fs::path(".");
  const std::string filename = target.filename().string();
  if (filename.empty() || filename == "." || filename == "..") {
    throw RuntimeFailure("cannot write " + path + ": not a file name");
  }

  // A hidden, unique sibling: same directory, hence the same file system, hence rename is atomic.
  static std::atomic<unsigned> counter{0};
  std::string temp_path;
  int fd = -1;
  for (int attempt = 0; attempt < 100 && fd < 0; ++attempt) {
    temp_path = (directory / ("." + filename + ".tmp." + std::to_string(::getpid()) + "." +
                              std::to_string(counter.fetch_add(1))))
                    .string();
    fd = ::open(temp_path.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0666);
    if (fd < 0 && errno != EEXIST) throw fail("cannot create a temporary file in " + directory.string(), errno);
  }
  if (fd < 0) throw fail("cannot create a unique temporary file in " + directory.string(), EEXIST);
  interrupt::TemporaryPath removed_if_interrupted(temp_path);  // until it is renamed into place

  auto discard = [&](const std::string& what) {
    const int error_number = errno;
    if (fd >= 0) ::close(fd);
    ::unlink(temp_path.c_str());
    throw fail(what, error_number);
  };
  const char* data = content.data();
  std::size_t remaining = content.size();
  while (remaining > 0) {
    const ssize_t written = ::write(fd, data, remaining);
    if (written < 0) {
      if (errno == EINTR) continue;
      discard("write failed");
    }
    data += written;
    remaining -= static_cast<std::size_t>(written);
  }
  if (::fsync(fd) != 0) discard("fsync failed");
  const int close_result = ::close(fd);
  fd = -1;
  if (close_result != 0) discard("close failed");
  if (::rename(temp_path.c_str(), path.c_str()) != 0) discard("rename of " + temp_path + " failed");
  // Make the rename itself durable; best effort (some file systems refuse fsync on directories).
  const int dir_fd = ::open(directory.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dir_fd >= 0) {
    ::fsync(dir_fd);
    ::close(dir_fd);
  }
}

std::vector<std::string> writeFilesAtomically(const std::vector<std::pair<std::string, std::string>>& files) {
  std::vector<std::string> written;
  try {
    for (const auto& [path, content] : files) {
      if (path.empty()) continue;
      writeFileAtomically(path, content);
      written.push_back(path);
    }
  } catch (...) {
    for (const std::string& path : written) std::remove(path.c_str());
    throw;
  }
  return written;
}

}  // namespace moe
