// One file per subcommand (CLI11 example style): an options struct, a setup function that declares
// the options with their validators, and a run function that returns the exit code. Errors are
// thrown and mapped to exit codes in main.cpp only.
#pragma once

#include <CLI/CLI.hpp>
#include <string>

namespace moe::cli {

// The report outputs every checking subcommand (run, verify, sweep, selftest) takes.
struct ReportOutputOptions {
  std::string report_json;  // --report: the JSON report; empty = not written
  std::string junit_xml;    // --junit: JUnit XML; empty = not written
  bool quiet = false;       // -q
};

// Adds --report, --junit and -q,--quiet. `kind` is the JSON report's kind, `testcase` what one JUnit
// testcase stands for, `quiet_help` what -q leaves out.
inline void addReportOutputOptions(CLI::App& sub, ReportOutputOptions& out, const std::string& kind,
                                   const std::string& testcase, const std::string& quiet_help) {
  sub.add_option("--report", out.report_json, "Write the JSON report (kind " + kind + ", schema_version 1) here");
  sub.add_option("--junit", out.junit_xml, "Write JUnit XML (one testcase per " + testcase + ") here");
  sub.add_flag("-q,--quiet", out.quiet, quiet_help);
}

// Each setup function adds its subcommand to `app`; when that subcommand is parsed, its callback
// stores the run function's exit code in `exit_code`.
void setupRunCommand(CLI::App& app, int& exit_code);
void setupValidateCommand(CLI::App& app, int& exit_code);
void setupListCommand(CLI::App& app, int& exit_code);
void setupSweepCommand(CLI::App& app, int& exit_code);
void setupSelftestCommand(CLI::App& app, int& exit_code);
void setupVerifyCommand(CLI::App& app, int& exit_code);

}  // namespace moe::cli
