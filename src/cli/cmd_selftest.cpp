// `moe-lbcheck selftest`: injects every fault, fails unless each is flagged with its signature.
#include <iostream>
#include <memory>
#include <sstream>
#include <string>

#include <fmt/format.h>

#include "app/selftest.hpp"
#include "cli/commands.hpp"
#include "common/errors.hpp"
#include "report/reporters.hpp"
#include "sim/emulated_backend.hpp"

namespace moe::cli {

struct SelftestOptions {
  std::string export_dir;
  std::string report_json;
  std::string junit_xml;
  bool quiet = false;
};

int runSelftestCommand(const SelftestOptions& opt) {
  if (!opt.export_dir.empty()) {
    exportSelftestScenarios(opt.export_dir);
    std::cout << "wrote " << selftestCases().size() * 2 << " scenarios to " << opt.export_dir << "\n";
    return 0;
  }
  std::ostringstream console, json, junit;
  ConsoleReporter console_reporter(console);
  JsonReporter json_reporter(json);
  JUnitReporter junit_reporter(junit);
  EmulatedBackend backend;
  const Report report = runSelftest(backend, {&console_reporter, &json_reporter, &junit_reporter},
                                    [&](int i, int n, const std::string& fault) {
                                      if (!opt.quiet) std::cerr << fmt::format("[{}/{}] {}\n", i + 1, n, fault);
                                    });
  writeFilesAtomically({{opt.report_json, json.str()}, {opt.junit_xml, junit.str()}});
  std::cout << console.str() << std::flush;
  return report.summary.verdict == Verdict::kPass ? 0 : static_cast<int>(ExitCode::kCheckFailed);
}

void setupSelftestCommand(CLI::App& app, int& exit_code) {
  auto opt = std::make_shared<SelftestOptions>();
  CLI::App* sub = app.add_subcommand("selftest", "Inject every fault; fail unless each is flagged with its signature");
  sub->add_option("--export", opt->export_dir,
                  "Instead of running, write each built-in case and its fixed twin as scenario files here")
      ->check(CLI::ExistingDirectory);
  sub->add_option("--report", opt->report_json, "Write the selftest as JSON (schema_version 1) here");
  sub->add_option("--junit", opt->junit_xml, "Write JUnit XML (one testcase per fault) here");
  sub->add_flag("-q,--quiet", opt->quiet, "No progress on stderr");
  sub->callback([opt, &exit_code] { exit_code = runSelftestCommand(*opt); });
}

}  // namespace moe::cli
