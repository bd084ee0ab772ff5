// Command-line overrides of a scenario shared by `run` and `sweep`: --mesh, --preset, --fault,
// --dtype, --with-open-bugs. Applied to the loaded scenario, which is then validated again.
#pragma once

#include <string>
#include <vector>

#include <CLI/CLI.hpp>

#include "scenario/scenario.hpp"

namespace moe::cli {

struct ScenarioOverrides {
  std::string mesh;                 // "dp=4,pp=2,cp=1,mb=4" (keys: dp pp cp tp ep sp mb|microbatches vp)
  std::string preset;               // empty = the scenario's
  std::vector<std::string> faults;  // added to the scenario's
  std::string dtype;                // empty = the scenario's
  bool with_open_bugs = false;      // sets framework.open_bugs
};

void addOverrideOptions(CLI::App& sub, ScenarioOverrides& overrides);

// Applies the overrides and re-validates; throws UsageError for a malformed --mesh and InputError
// (naming the scenario file and the field) when the result is inconsistent.
void applyOverrides(Scenario& scenario, const ScenarioOverrides& overrides);

}  // namespace moe::cli
