// `moe-lbcheck selftest`: injects every fault, fails unless each is flagged with its signature.
#include <iostream>
#include <memory>
#include <string>

#include <fmt/format.h>

#include "app/selftest.hpp"
#include "cli/commands.hpp"
#include "common/errors.hpp"

namespace moe::cli {

struct SelftestOptions {
  std::string export_dir;
  bool quiet = false;
};

int runSelftestCommand(const SelftestOptions& opt) {
  if (!opt.export_dir.empty()) {
    exportSelftestScenarios(opt.export_dir);
    std::cout << "wrote " << selftestCases().size() * 2 << " scenarios to " << opt.export_dir << "\n";
    return 0;
  }
  const auto rows = runSelftest({}, [&](int i, int n, const std::string& fault) {
    if (!opt.quiet) std::cerr << fmt::format("[{}/{}] {}\n", i + 1, n, fault);
  });
  std::cout << renderSelftestConsole(rows) << std::flush;
  for (const auto& r : rows)
    if (!r.flagged || !r.twin_passes) return static_cast<int>(ExitCode::kCheckFailed);
  return 0;
}

void setupSelftestCommand(CLI::App& app, int& exit_code) {
  auto opt = std::make_shared<SelftestOptions>();
  CLI::App* sub = app.add_subcommand("selftest", "Inject every fault; fail unless each is flagged with its signature");
  sub->add_option("--export", opt->export_dir,
                  "Instead of running, write each built-in case and its fixed twin as scenario files here")
      ->check(CLI::ExistingDirectory);
  sub->add_flag("-q,--quiet", opt->quiet, "No progress on stderr");
  sub->callback([opt, &exit_code] { exit_code = runSelftestCommand(*opt); });
}

}  // namespace moe::cli
