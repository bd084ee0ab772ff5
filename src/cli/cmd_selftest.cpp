// `moe-lbcheck selftest`: injects every fault, fails unless each is flagged with its signature.
#include <fmt/format.h>

#include <iostream>
#include <memory>
#include <string>

#include "app/selftest.hpp"
#include "cli/commands.hpp"
#include "cli/report_output.hpp"
#include "common/errors.hpp"
#include "report/reporters.hpp"
#include "sim/emulated_backend.hpp"

namespace moe::cli {

struct SelftestOptions {
  std::string export_dir;
  ReportOutputOptions output;
};

int runSelftestCommand(const SelftestOptions& opt) {
  if (!opt.export_dir.empty()) {
    exportSelftestScenarios(opt.export_dir);
    std::cout << "wrote " << selftestCases().size() * 2 << " scenarios to " << opt.export_dir << "\n";
    return 0;
  }
  StreamedReport rendered;
  EmulatedBackend backend;
  const Report report = runSelftest(backend, rendered.reporters(), [&](int i, int n, const std::string& fault) {
    if (!opt.output.quiet) std::cerr << fmt::format("[{}/{}] {}\n", i + 1, n, fault);
  });
  return rendered.emit(report, opt.output);
}

void setupSelftestCommand(CLI::App& app, int& exit_code) {
  auto opt = std::make_shared<SelftestOptions>();
  CLI::App* sub = app.add_subcommand("selftest", "Inject every fault; fail unless each is flagged with its signature");
  sub->add_option("--export", opt->export_dir,
                  "Instead of running, write each built-in case and its fixed twin as scenario files here")
      ->check(CLI::ExistingDirectory);
  addReportOutputOptions(*sub, opt->output, "selftest", "fault", "No progress on stderr");
  sub->callback([opt, &exit_code] { exit_code = runSelftestCommand(*opt); });
}

}  // namespace moe::cli
