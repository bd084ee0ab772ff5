// How the subcommands write a report: --report (JSON) and --junit files rendered whole and written
// atomically, both or neither, before the console text is printed; for reports produced row by row
// (sweep and selftest stream rows to reporters), the three reporters and the same writing. Torch-free.
#pragma once

#include <iostream>
#include <sstream>
#include <string>
#include <vector>

#include "cli/commands.hpp"
#include "common/errors.hpp"
#include "report/reporters.hpp"

namespace moe::cli {

// Renders the report as JSON and as JUnit for the paths that are not empty and writes them atomically
// (writeFilesAtomically); returns the paths written, for removal should a later output fail.
inline std::vector<std::string> writeReportFiles(const Report& report, const ReportOutputOptions& output) {
  std::string json_text, junit_text;
  if (!output.report_json.empty()) json_text = renderReport(report, ReportFormat::kJson);
  if (!output.junit_xml.empty()) junit_text = renderReport(report, ReportFormat::kJUnit);
  return writeFilesAtomically({{output.report_json, json_text}, {output.junit_xml, junit_text}});
}

class StreamedReport {
 public:
  // Console, JSON and JUnit, in that order.
  std::vector<Reporter*> reporters() { return {&console_reporter_, &json_reporter_, &junit_reporter_}; }

  // Writes --report and --junit (an empty path: not written), prints the console text and returns the
  // exit code of the report's verdict (0 pass, 1 a check failed).
  int emit(const Report& report, const ReportOutputOptions& output) {
    writeFilesAtomically({{output.report_json, json_.str()}, {output.junit_xml, junit_.str()}});
    std::cout << console_.str() << std::flush;
    return report.summary.verdict == Verdict::kPass ? 0 : static_cast<int>(ExitCode::kCheckFailed);
  }

 private:
  std::ostringstream console_, json_, junit_;
  ConsoleReporter console_reporter_{console_};
  JsonReporter json_reporter_{json_};
  JUnitReporter junit_reporter_{junit_};
};

}  // namespace moe::cli
