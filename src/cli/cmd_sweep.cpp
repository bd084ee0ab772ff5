// `moe-lbcheck sweep SCENARIO.json --world N`: every dp x pp x cp (x M) layout the scenario allows.
#include <fmt/format.h>

#include <iostream>
#include <memory>
#include <string>

#include "app/sweep.hpp"
#include "cli/commands.hpp"
#include "cli/overrides.hpp"
#include "cli/report_output.hpp"
#include "common/errors.hpp"
#include "report/reporters.hpp"
#include "sim/emulated_backend.hpp"

namespace moe::cli {

struct SweepCliOptions {
  std::string scenario;
  int world = 0;
  bool fixed_microbatches = false;
  ScenarioOverrides overrides;
  ReportOutputOptions output;
};

int runSweepCommand(const SweepCliOptions& opt) {
  Scenario sc = loadScenarioFile(opt.scenario);
  applyOverrides(sc, opt.overrides);
  SweepOptions options;
  options.world = opt.world;
  options.all_microbatches = !opt.fixed_microbatches;
  planSweep(sc, options);  // no valid layout: exit 2 before any output
  StreamedReport rendered;
  EmulatedBackend backend;
  const Report report = runSweep(sc, options, backend, rendered.reporters(), [&](int i, int n, const MeshConfig& m) {
    if (!opt.output.quiet)
      std::cerr << fmt::format("[{}/{}] dp={} pp={} cp={} M={}\n", i + 1, n, m.dp, m.pp, m.cp, m.microbatches);
  });
  return rendered.emit(report, opt.output);
}

void setupSweepCommand(CLI::App& app, int& exit_code) {
  auto opt = std::make_shared<SweepCliOptions>();
  CLI::App* sub = app.add_subcommand("sweep", "Run a scenario on every layout of a world size; exit 1 if any fails");
  sub->add_option("scenario", opt->scenario, "Scenario JSON file")->required();
  sub->add_option("--world", opt->world, "World size tp*dp*pp*cp (the ranks of the layouts tried)")->required()->check(CLI::Range(1, 4096));
  sub->add_flag("--fixed-microbatches", opt->fixed_microbatches,
                "Keep the scenario's microbatch count instead of trying every count the batch allows");
  addOverrideOptions(*sub, opt->overrides);
  addReportOutputOptions(*sub, opt->output, "sweep", "layout", "No progress on stderr");
  sub->callback([opt, &exit_code] { exit_code = runSweepCommand(*opt); });
}

}  // namespace moe::cli
