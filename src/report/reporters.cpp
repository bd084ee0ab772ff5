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

namespace moe {
namespace {

using ordered_json = nlohmann::ordered_json;

// ---------------------------------------------------------------- shared helpers

// The resolved scenario echoed in the report, as a JSON object ({} when the report carries none).
// Json is nlohmann::json or nlohmann::ordered_json (which keeps the scenario's own key order).
template <class Json = nlohmann::json>
Json parseScenarioJson(const Report& report) {
  if (report.scenario_json.empty()) return Json::object();
  try {
    Json parsed = Json::parse(report.scenario_json);
    if (!parsed.is_object()) {
      throw RuntimeFailure("report: the resolved scenario is not a JSON object");
    }
    return parsed;
  } catch (const nlohmann::json::exception& e) {
    throw RuntimeFailure(std::string("report: the resolved scenario is not valid JSON: ") + e.what());
  }
}

// A string member of a nested object ("" when absent or not a string): stringAt(j, {"framework", "preset"}).
std::string stringAt(const nlohmann::json& j, std::initializer_list<const char*> keys) {
  const nlohmann::json* node = &j;
  for (const char* key : keys) {
    if (!node->is_object() || !node->contains(key)) return "";
    node = &(*node)[key];
  }
  if (node->is_string()) return node->get<std::string>();
  if (node->is_number() || node->is_boolean()) return node->dump();
  return "";
}

std::string scenarioName(const nlohmann::json& scenario) {
  const std::string name = stringAt(scenario, {"name"});
  return name.empty() ? std::string("unnamed") : name;
}

struct CheckCounts {
  int deciding = 0;       // checks that decide the verdict
  int failed = 0;         // deciding checks that are not ok
  int informational = 0;  // findings that do not change the verdict
};

CheckCounts countChecks(const Report& report) {
  CheckCounts counts;
  for (const CheckResult& check : report.checks) {
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

// "CODE factor=F value=V: cause; fix: fix" (empty parts left out).
std::string describeDiagnosis(const Diagnosis& d) {
  std::string text = d.code;
  if (!d.factor.empty()) text += " factor=" + d.factor;
  if (!std::isnan(d.value)) text += " value=" + formatGeneral(d.value, 9);
  if (!d.cause.empty()) text += ": " + d.cause;
  if (!d.fix.empty()) text += (d.cause.empty() ? ": fix: " : "; fix: ") + d.fix;
  return text;
}

std::string describeMesh(const MeshSummary& m) {
  std::string text = fmt::format("dp={} pp={} cp={} M={} world={} backend={}", m.dp, m.pp, m.cp,
                                 m.microbatches, m.world, m.backend);
  if (!m.schedule.empty()) text += " schedule=" + m.schedule;
  return text;
}

// ---------------------------------------------------------------- console

struct TableLayout {
  std::size_t name_width = 5;
};

void writeTableHeader(std::ostream& out, const TableLayout& layout) {
  out << fmt::format("#  {:<{}}  {:>12}  {:>13}  {:>11}  {:>11}  {:>9}  {:>15}  {}\n", "check",
                     layout.name_width, "scale", "cosine", "max_abs_err", "max_rel_err", "rtol",
                     "#wrong/elements", "result");
}

void writeCheckRow(std::ostream& out, const TableLayout& layout, const CheckResult& c) {
  const std::string wrong = fmt::format("{}/{}", c.wrong, c.elements);
  out << fmt::format("   {:<{}}  {:>12}  {:>13}  {:>11}  {:>11}  {:>9}  {:>15}  {}\n", c.name,
                     layout.name_width, formatGeneral(c.scale), formatCosine(c.cosine),
                     formatScientific(c.max_abs_err), formatScientific(c.max_rel_err),
                     formatScientific(c.rtol, 1), wrong, resultWord(c));
  if (!c.diagnosis.code.empty()) out << "     -> " << describeDiagnosis(c.diagnosis) << "\n";
}

void writeFooter(std::ostream& out, const Report& report) {
  const CheckCounts counts = countChecks(report);
  const bool pass = effectiveVerdict(report) == "pass";
  std::string line = pass ? fmt::format("# moe-lbcheck: OK ({} checks, {} failed", counts.deciding,
                                        counts.failed)
                          : fmt::format("# moe-lbcheck: FAILED ({} of {} checks failed",
                                        counts.failed, counts.deciding);
  if (counts.informational > 0) line += fmt::format(", {} informational", counts.informational);
  out << line << ")\n";
  out << "# expectation: " << (report.expectation_met ? "met" : "not met");
  if (!report.expectation_detail.empty()) out << " (" << report.expectation_detail << ")";
  out << "\n";
}

}  // namespace

void ConsoleReporter::write(const Report& report, std::ostream& out) const {
  const nlohmann::json scenario = parseScenarioJson(report);
  TableLayout layout;
  for (const CheckResult& c : report.checks) layout.name_width = std::max(layout.name_width, c.name.size());

  if (options_.quiet) {
    bool header_written = false;
    for (const CheckResult& c : report.checks) {
      if (c.informational || c.ok) continue;
      if (!header_written) writeTableHeader(out, layout);
      header_written = true;
      writeCheckRow(out, layout, c);
    }
    writeFooter(out, report);
    return;
  }

  std::string tool_line = "# moe-lbcheck " + (report.tool.version.empty() ? "?" : report.tool.version);
  if (!report.tool.torch_version.empty()) tool_line += "  torch " + report.tool.torch_version;
  if (!report.tool.features.empty()) {
    std::string features;
    for (const std::string& f : report.tool.features) features += (features.empty() ? "" : ",") + f;
    tool_line += "  features: " + features;
  }
  out << tool_line << "\n";
  out << "# scenario: " << scenarioName(scenario);
  if (!report.scenario_file.empty()) out << "  (" << report.scenario_file << ")";
  out << "\n";
  out << "# mesh: " << describeMesh(report.mesh) << "\n";

  std::string setup = "# preset: " + stringAt(scenario, {"framework", "preset"});
  if (scenario.contains("faults") && scenario["faults"].is_array() && !scenario["faults"].empty()) {
    std::string faults;
    for (const auto& f : scenario["faults"]) {
      faults += (faults.empty() ? "" : ",") + (f.is_string() ? f.get<std::string>() : f.dump());
    }
    setup += "  faults: " + faults;
  }
  const std::string aux_type = stringAt(scenario, {"aux", "type"});
  if (!aux_type.empty()) {
    setup += "  aux: " + aux_type + " coeff=" + stringAt(scenario, {"aux", "coeff"}) +
             " z_loss_coeff=" + stringAt(scenario, {"aux", "z_loss_coeff"});
  }
  const std::string dtype = stringAt(scenario, {"model", "dtype"});
  if (!dtype.empty()) setup += "  dtype: " + dtype;
  out << setup << "\n#\n";

  writeTableHeader(out, layout);
  for (const CheckResult& c : report.checks) writeCheckRow(out, layout, c);
  out << "#\n";

  const ReferenceSummary& r = report.reference;
  out << "# reference: method=" << (r.method.empty() ? "-" : r.method)
      << ", step=" << formatScientific(r.step, 2)
      << ", fd error estimate=" << formatScientific(r.fd_error_estimate, 2)
      << ", near-ties=" << r.near_ties << ", frozen=" << r.frozen_tokens
      << ", empty groups=" << r.empty_groups << "\n";
  out << "# objective: aux=" << formatGeneral(r.aux_value, 9) << " z=" << formatGeneral(r.z_value, 9)
      << " main=" << formatGeneral(r.main_value, 9) << "\n";
  out << "# timing: reference " << formatSeconds(report.timing.reference_s) << " s, mesh "
      << formatSeconds(report.timing.mesh_s) << " s, total " << formatSeconds(report.timing.total_s)
      << " s\n";
  writeFooter(out, report);
}

// ---------------------------------------------------------------- JSON

namespace {

ordered_json numberOrNull(double value) {
  if (!std::isfinite(value)) return nullptr;
  return value;
}

ordered_json diagnosisJson(const Diagnosis& d) {
  if (d.code.empty()) return nullptr;
  ordered_json j;
  j["code"] = d.code;
  j["factor"] = d.factor;
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

}  // namespace

void JsonReporter::write(const Report& report, std::ostream& out) const {
  ordered_json j;
  j["schema_version"] = Report::kSchemaVersion;

  ordered_json tool;
  tool["version"] = report.tool.version;
  tool["torch_version"] = report.tool.torch_version;
  tool["features"] = report.tool.features;
  j["tool"] = tool;

  j["scenario_file"] = report.scenario_file;
  j["scenario"] = parseScenarioJson<ordered_json>(report);

  ordered_json mesh;
  mesh["dp"] = report.mesh.dp;
  mesh["pp"] = report.mesh.pp;
  mesh["cp"] = report.mesh.cp;
  mesh["microbatches"] = report.mesh.microbatches;
  mesh["world"] = report.mesh.world;
  mesh["backend"] = report.mesh.backend;
  mesh["schedule"] = report.mesh.schedule;
  j["mesh"] = mesh;

  j["verdict"] = effectiveVerdict(report);
  j["expectation_met"] = report.expectation_met;
  j["expectation_detail"] = report.expectation_detail;

  ordered_json checks = ordered_json::array();
  for (const CheckResult& c : report.checks) checks.push_back(checkJson(c));
  j["checks"] = checks;

  const ReferenceSummary& r = report.reference;
  ordered_json reference;
  reference["method"] = r.method;
  reference["step"] = numberOrNull(r.step);
  reference["fd_error_estimate"] = numberOrNull(r.fd_error_estimate);
  reference["near_ties"] = r.near_ties;
  reference["frozen_tokens"] = r.frozen_tokens;
  reference["empty_groups"] = r.empty_groups;
  reference["aux_value"] = numberOrNull(r.aux_value);
  reference["z_value"] = numberOrNull(r.z_value);
  reference["main_value"] = numberOrNull(r.main_value);
  reference["seconds"] = numberOrNull(r.seconds);
  j["reference"] = reference;

  ordered_json timing;
  timing["reference_s"] = numberOrNull(report.timing.reference_s);
  timing["mesh_s"] = numberOrNull(report.timing.mesh_s);
  timing["total_s"] = numberOrNull(report.timing.total_s);
  j["timing"] = timing;

  // error_handler::replace: a non-UTF-8 byte in a name or message must not abort the report.
  out << j.dump(options_.indent, ' ', false, nlohmann::json::error_handler_t::replace) << "\n";
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
  std::string summary = fmt::format(
      "scale={} cosine={} max_abs_err={} max_rel_err={} rtol={} wrong={}/{}", formatGeneral(c.scale),
      formatCosine(c.cosine), formatScientific(c.max_abs_err), formatScientific(c.max_rel_err),
      formatScientific(c.rtol, 1), c.wrong, c.elements);
  if (!c.diagnosis.code.empty()) summary += "; " + describeDiagnosis(c.diagnosis);
  return summary;
}

void writeProperty(std::ostream& out, const std::string& name, const std::string& value) {
  out << "      <property name=\"" << attr(name) << "\" value=\"" << attr(value) << "\"/>\n";
}

}  // namespace

void JUnitReporter::write(const Report& report, std::ostream& out) const {
  const nlohmann::json scenario = parseScenarioJson(report);
  const std::string name = scenarioName(scenario);
  const CheckCounts counts = countChecks(report);
  const std::size_t tests = report.checks.size();
  const std::string time = formatSeconds(std::isfinite(report.timing.total_s) ? report.timing.total_s : 0.0);
  // A scenario that reproduces a bug expects its checks to fail: when they fail as expected the run
  // exits 0, so CI dashboards must not show red either: those checks are reported as skipped
  // ("expected failure") instead of failed.
  const bool expected_failure = report.expectation_met && effectiveVerdict(report) == "fail";
  const int failures = expected_failure ? 0 : counts.failed;
  const int skipped = expected_failure ? counts.failed : 0;

  out << "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n";
  out << "<testsuites name=\"moe-lbcheck\" tests=\"" << tests << "\" failures=\"" << failures
      << "\" errors=\"0\" time=\"" << time << "\">\n";
  out << "  <testsuite name=\"" << attr(name) << "\" tests=\"" << tests << "\" failures=\""
      << failures << "\" errors=\"0\" skipped=\"" << skipped << "\" time=\"" << time << "\">\n";

  out << "    <properties>\n";
  writeProperty(out, "scenario_file", report.scenario_file);
  writeProperty(out, "mesh", describeMesh(report.mesh));
  writeProperty(out, "preset", stringAt(scenario, {"framework", "preset"}));
  writeProperty(out, "verdict", effectiveVerdict(report));
  writeProperty(out, "expectation_met", report.expectation_met ? "true" : "false");
  writeProperty(out, "expectation_detail", report.expectation_detail);
  writeProperty(out, "reference_method", report.reference.method);
  writeProperty(out, "fd_error_estimate", formatScientific(report.reference.fd_error_estimate, 2));
  writeProperty(out, "near_ties", std::to_string(report.reference.near_ties));
  writeProperty(out, "tool_version", report.tool.version);
  out << "    </properties>\n";

  const std::string classname = "moe-lbcheck." + name;
  for (const CheckResult& c : report.checks) {
    out << "    <testcase name=\"" << attr(c.name) << "\" classname=\"" << attr(classname)
        << "\" time=\"0\"";
    const std::string summary = checkSummary(c);
    if (c.ok && !c.informational) {
      out << "/>\n";
      continue;
    }
    out << ">\n";
    if (!c.informational && !c.ok && expected_failure) {
      out << "      <skipped message=\"" << attr("expected failure (the scenario reproduces a bug): " + summary)
          << "\"/>\n";
    } else if (!c.informational && !c.ok) {
      const std::string type = c.diagnosis.code.empty() ? std::string("CHECK_FAILED") : c.diagnosis.code;
      out << "      <failure message=\"" << attr(summary) << "\" type=\"" << attr(type) << "\">"
          << text(summary);
      if (!c.method.empty()) out << text("\nreference method: " + c.method);
      out << "</failure>\n";
    } else if (c.informational) {
      out << "      <system-out>" << text("INFO " + summary) << "</system-out>\n";
    }
    out << "    </testcase>\n";
  }
  out << "  </testsuite>\n</testsuites>\n";
}

// ---------------------------------------------------------------- common entry points

std::string renderToString(const Reporter& reporter, const Report& report) {
  std::ostringstream out;
  reporter.write(report, out);
  return out.str();
}

std::string effectiveVerdict(const Report& report) {
  if (!report.verdict.empty()) return report.verdict;
  return countChecks(report).failed == 0 ? "pass" : "fail";
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

std::vector<std::string> writeFilesAtomically(
    const std::vector<std::pair<std::string, std::string>>& files) {
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
