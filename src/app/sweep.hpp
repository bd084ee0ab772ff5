// `moe-lbcheck sweep`: the same scenario on every tp x cp x dp x pp (x M) layout of a world size that
// the scenario and its preset allow (ep and sequence_parallel kept as the scenario sets them), one row
// per layout. The CI gate for parallelism invariance of the aux gradient.
#pragma once

#include <functional>
#include <string>
#include <vector>

#include "app/check_run.hpp"
#include "report/report.hpp"
#include "report/reporters.hpp"
#include "scenario/scenario.hpp"

namespace moe {

struct SweepOptions {
  int world = 1;
  bool all_microbatches = true;  // also vary M over every count the batch allows (else keep the scenario's)
  CheckRunOptions run;
};

// Every layout of `options.world` that validateScenario accepts, in a fixed order.
struct SweepPlan {
  std::vector<Scenario> layouts;
  int skipped_layouts = 0;  // factorizations the scenario does not allow (batch, seq_len, layers)
};
// Every (tp, dp, pp, cp) with tp*dp*pp*cp == world and, when all_microbatches, every M dividing the
// per-replica batch, that validateScenario accepts. Throws InputError when no layout is valid.
SweepPlan planSweep(const Scenario& scenario, const SweepOptions& options);

// Runs every layout of the plan with `backend`, one row per layout fed to `reporter` as soon as it is
// done (context first, summary last). `progress` (may be empty) is called before each layout.
// Returns the report (kind sweep).
Report runSweep(const Scenario& scenario, const SweepOptions& options, MeshBackend& backend,
                const std::vector<Reporter*>& reporters,
                const std::function<void(int index, int total, const MeshConfig&)>& progress);

}  // namespace moe
