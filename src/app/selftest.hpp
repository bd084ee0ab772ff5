// `moe-lbcheck selftest`: injects every catalog fault into a built-in scenario chosen so that its
// signature is visible and distinguishable (dp=3, M=5, cp=2: no two mesh quantities equal), and
// fails unless each is flagged with its expected diagnosis and factor while its fixed twin passes.
// The tool testing its own power.
#pragma once

#include <functional>
#include <string>
#include <vector>

#include "app/check_run.hpp"
#include "scenario/scenario.hpp"

namespace moe {

// One built-in bug reproduction: the scenario with the fault and its `expect`, per catalog entry.
struct SelftestCase {
  std::string fault;
  Scenario buggy;  // faults = {fault}; expect = the catalog's signature
  Scenario fixed;  // the same without the fault; expect pass
};

std::vector<SelftestCase> selftestCases();

struct SelftestRow {
  std::string fault;
  std::string mesh;
  std::string expected;  // "CODE factor"
  std::string measured;  // the diagnosis found on the buggy run
  double scale = 0.0;    // aux-gradient scale of the buggy run (worst layer)
  bool flagged = false;  // the buggy run met its expectation
  bool twin_passes = false;
};

std::vector<SelftestRow> runSelftest(const CheckRunOptions& options,
                                     const std::function<void(int, int, const std::string&)>& progress);
std::string renderSelftestConsole(const std::vector<SelftestRow>& rows);

// Writes the cases as scenario files (<fault>.json and <fault>-fixed.json) into `directory`.
void exportSelftestScenarios(const std::string& directory);

}  // namespace moe
