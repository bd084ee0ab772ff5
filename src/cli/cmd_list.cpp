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
    for (const PresetRecord& p : presetCatalog()) {
      std::string bugs;
      for (Fault f : p.open_bugs) bugs += (bugs.empty() ? "" : ", ") + std::string(toString(f));
      std::cout << fmt::format("{:<20} {}\n{:<20} source: {}\n{:<20} TP/SP/EP: {}\n{:<20} open bugs (run --with-open-bugs): {}\n",
                               p.name, p.summary, "", p.source, "", p.parallel_source, "", bugs.empty() ? "none known" : bugs);
    }
  } else {
    for (const FaultRecord& f : faultCatalog()) {
      const std::string factor = f.expected_factor;
      std::cout << fmt::format("{:<38} {}\n{:<38} source: {}; expected: {}{}\n", f.name, f.summary, "", f.source,
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
