// `moe-lbcheck validate SCENARIO.json...`: schema and consistency only.
#include <iostream>
#include <memory>
#include <string>
#include <vector>

#include "cli/commands.hpp"
#include "common/errors.hpp"
#include "scenario/scenario.hpp"

namespace moe::cli {

struct ValidateOptions {
  std::vector<std::string> files;
  bool quiet = false;
};

// Validates every file; prints one line per file; exit 2 if any is invalid (all are checked).
int runValidate(const ValidateOptions& opt) {
  int invalid = 0;
  for (const std::string& file : opt.files) {
    try {
      const Scenario sc = loadScenarioFile(file);
      if (!opt.quiet) std::cout << "OK      " << file << " (" << sc.name << ")\n";
    } catch (const InputError& e) {
      ++invalid;
      std::cout << "INVALID " << e.what() << "\n";
    }
  }
  if (!opt.quiet)
    std::cout << "# " << opt.files.size() - invalid << " valid, " << invalid << " invalid\n";
  return invalid == 0 ? 0 : static_cast<int>(ExitCode::kInvalidInput);
}

void setupValidateCommand(CLI::App& app, int& exit_code) {
  auto opt = std::make_shared<ValidateOptions>();
  CLI::App* sub = app.add_subcommand("validate", "Check scenario files against the schema and rules");
  sub->add_option("scenarios", opt->files, "Scenario JSON files")->required();
  sub->add_flag("-q,--quiet", opt->quiet, "Print only invalid files");
  sub->callback([opt, &exit_code] { exit_code = runValidate(*opt); });
}

}  // namespace moe::cli
