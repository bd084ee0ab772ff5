// One `moe-lbcheck run`: the reference, the mesh runs that isolate the aux gradient, the checks and
// the report. The CLI only parses options and writes files; everything else happens here.
#pragma once

#include <string>
#include <vector>

#include "data/problem.hpp"
#include "report/report.hpp"
#include "scenario/scenario.hpp"

namespace moe {

struct CheckRunOptions {
  std::string backend = "emulated";
  int directional_checks = 2;
};

struct CheckRunOutput {
  Report report;
  ProblemData data;
  std::vector<std::vector<double>> reference_aux_grad;  // per layer [H*E]
  std::vector<std::vector<double>> mesh_aux_grad;
};

// Runs every check of DESIGN §6 on a validated scenario. Throws RuntimeFailure when the mesh fails.
CheckRunOutput runChecks(const Scenario& scenario, const CheckRunOptions& options = {});

// ToolInfo of this build (version, torch version, features).
ToolInfo toolInfo();

}  // namespace moe
