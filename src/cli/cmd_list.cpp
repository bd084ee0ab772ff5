// `moe-lbcheck list presets|faults`: one line each, with the source it reproduces.
#include <iostream>
#include <memory>
#include <string>

#include <fmt/format.h>

#include "cli/commands.hpp"
#include "scenario/catalog.hpp"

namespace moe::cli {

struct ListOptions {
  std::string what;
};

int runList(const ListOptions& opt) {
  if (opt.what == "presets") {
    for (const PresetInfo& p : presetCatalog())
      std::cout << fmt::format("{:<20} {}\n{:<20} source: {}\n", p.name, p.summary, "", p.source);
  } else {
    for (const FaultInfo& f : faultCatalog())
      std::cout << fmt::format("{:<34} {}\n{:<34} source: {}; expected: {}{}\n", f.name, f.summary, "",
                               f.source, f.expected_diagnosis,
                               f.expected_factor.empty() ? "" : " factor " + f.expected_factor);
  }
  return 0;
}

void setupListCommand(CLI::App& app, int& exit_code) {
  auto opt = std::make_shared<ListOptions>();
  CLI::App* sub = app.add_subcommand("list", "List the framework presets or the named faults");
  sub->add_option("what", opt->what, "presets | faults")
      ->required()
      ->check(CLI::IsMember({"presets", "faults"}));
  sub->callback([opt, &exit_code] { exit_code = runList(*opt); });
}

}  // namespace moe::cli
