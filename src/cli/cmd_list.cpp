// `moe-lbcheck list presets|faults`: one entry each, with the source it follows.
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
    for (const PresetRecord& p : presetCatalog())
      std::cout << fmt::format("{:<20} {}\n{:<20} source: {}\n", p.name, p.summary, "", p.source);
  } else {
    for (const FaultRecord& f : faultCatalog()) {
      const std::string factor = f.expected_factor;
      std::cout << fmt::format("{:<34} {}\n{:<34} source: {}; expected: {}{}\n", f.name, f.summary, "", f.source,
                               toString(f.expected_diagnosis), factor.empty() ? "" : " factor " + factor);
    }
  }
  return 0;
}

void setupListCommand(CLI::App& app, int& exit_code) {
  auto opt = std::make_shared<ListOptions>();
  CLI::App* sub = app.add_subcommand("list", "List the framework presets or the named faults");
  sub->add_option("what", opt->what, "presets | faults")->required()->check(CLI::IsMember({"presets", "faults"}));
  sub->callback([opt, &exit_code] { exit_code = runList(*opt); });
}

}  // namespace moe::cli
