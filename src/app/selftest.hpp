// `moe-lbcheck selftest`: injects every catalog fault into a built-in scenario on the fault's selftest
// mesh (its catalog record: the preset and scope that express it, dp=3, M=5, cp=2 where CP matters:
// no two mesh quantities equal), and fails unless each is flagged with its expected diagnosis and
// factor while its fixed twin passes. The tool testing its own power.
#pragma once

#include <functional>
#include <string>
#include <vector>

#include "app/check_run.hpp"
#include "report/report.hpp"
#include "report/reporters.hpp"
#include "scenario/scenario.hpp"

namespace moe {

// One built-in bug reproduction: the scenario with the fault and its `expect`, per catalog entry.
struct SelftestCase {
  Fault fault;
  Scenario buggy;  // faults = {fault}; expect = the catalog's signature
  Scenario fixed;  // the same without the fault; expect pass
};

std::vector<SelftestCase> selftestCases();

// Runs every case with `backend`, one row per fault fed to the reporters as soon as it is done.
Report runSelftest(MeshBackend& backend, const std::vector<Reporter*>& reporters,
                   const std::function<void(int, int, const std::string&)>& progress);

// Writes the cases as scenario files (<fault>.json and <fault>-fixed.json) into `directory`.
void exportSelftestScenarios(const std::string& directory);

}  // namespace moe
