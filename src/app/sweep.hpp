// `moe-lbcheck sweep`: the same scenario on every dp x pp x cp (x M) layout of a world size, one
// row per layout (DESIGN §6). The CI gate for parallelism invariance of the aux gradient.
#pragma once

#include <functional>
#include <string>
#include <vector>

#include "app/check_run.hpp"
#include "report/report.hpp"
#include "scenario/scenario.hpp"

namespace moe {

struct SweepOptions {
  int world = 1;
  bool all_microbatches = true;  // also vary M over every count the batch allows (else keep the scenario's)
  CheckRunOptions run;
};

struct SweepRow {
  MeshSummary mesh;
  std::string verdict;        // "pass" | "fail"
  double worst_scale = 1.0;   // aux-gradient scale furthest from 1 over the layers
  double worst_cosine = 1.0;  // smallest aux-gradient cosine over the layers
  Diagnosis diagnosis;        // of the first failing check, if any
  std::string failing_check;
  std::vector<std::string> findings;  // informational diagnosis codes (e.g. OBJECTIVE_NOT_INVARIANT)
  double seconds = 0.0;
};

struct SweepResult {
  ToolInfo tool;
  std::string scenario_json;
  std::string scenario_file;
  int world = 1;
  std::vector<SweepRow> rows;
  int skipped_layouts = 0;  // factorizations the scenario does not allow (batch, seq_len, layers)
  bool passed() const;
};

// Every (dp, pp, cp) with dp*pp*cp == world and, when all_microbatches, every M dividing the
// per-replica batch, that validateScenario accepts. `progress` (may be empty) is called before each.
SweepResult runSweep(const Scenario& scenario, const SweepOptions& options,
                     const std::function<void(int index, int total, const MeshConfig&)>& progress);

std::string renderSweepConsole(const SweepResult& result);
std::string renderSweepJson(const SweepResult& result);   // schema_version 1, "kind": "sweep"
std::string renderSweepJUnit(const SweepResult& result);  // one testcase per layout

}  // namespace moe
