// `moe-lbcheck run SCENARIO.json [options]`: check one scenario on one mesh.
#include <cstdio>
#include <iostream>
#include <memory>
#include <string>
#include <vector>

#include "app/backends.hpp"
#include "app/capture_export.hpp"
#include "app/check_run.hpp"
#include "cli/commands.hpp"
#include "cli/overrides.hpp"
#include "cli/report_output.hpp"
#include "common/errors.hpp"
#include "data/problem_io.hpp"
#include "report/reporters.hpp"

namespace moe::cli {

struct RunOptions {
  std::string scenario;
  ScenarioOverrides overrides;
  BackendOptions backend;
  ReportOutputOptions output;
  std::string dump_safetensors;
  std::string capture_dir;
};

// Rank 0's (or the emulated process's) part: the checks, then every output rendered first and
// written all or nothing.
int leadRun(const RunOptions& opt, const Scenario& sc, MeshBackend& backend) {
  if (!opt.capture_dir.empty()) requireCaptureDirectoryFree(opt.capture_dir);  // before any work
  CheckRunOptions run_options;
  run_options.capture = !opt.capture_dir.empty();
  CheckRunOutput out = runChecks(sc, backend, run_options);
  const std::string console_text = renderReport(out.report, ReportFormat::kConsole, ConsoleOptions{opt.output.quiet});
  const std::vector<std::string> written = writeReportFiles(out.report, opt.output);
  try {
    if (!opt.dump_safetensors.empty())
      dumpProblemAndGradients(opt.dump_safetensors, out.data, out.reference_aux_grad, out.mesh_aux_grad);
    // The capture is written last: nothing can fail after it.
    if (out.capture_run)
      writeCaptureDirectory(opt.capture_dir, captureOfMeshRun(sc, out.data, *out.capture_run, backend.name()));
  } catch (...) {
    for (const std::string& path : written) std::remove(path.c_str());  // no partial set of outputs
    if (!opt.dump_safetensors.empty()) std::remove(opt.dump_safetensors.c_str());
    throw;
  }
  std::cout << console_text << std::flush;
  return out.report.summary.expectation_met ? 0 : static_cast<int>(ExitCode::kCheckFailed);
}

int runRun(const RunOptions& opt) {
  Scenario sc = loadScenarioFile(opt.scenario);
  applyOverrides(sc, opt.overrides);
  return runWithMeshBackend(opt.backend, sc, [&](MeshBackend& backend) { return leadRun(opt, sc, backend); });
}

void setupRunCommand(CLI::App& app, int& exit_code) {
  auto opt = std::make_shared<RunOptions>();
  CLI::App* sub = app.add_subcommand("run", "Check one scenario's aux-loss gradient on one mesh");
  sub->add_option("scenario", opt->scenario, "Scenario JSON file")->required();
  addReportOutputOptions(*sub, opt->output, "run", "check", "Print only failures and the footer");
  addOverrideOptions(*sub, opt->overrides);
  sub->add_option("--backend", opt->backend.name, "Mesh backend")
      ->check(CLI::IsMember(backendNames()))
      ->capture_default_str();
  sub->add_option("--nproc", opt->backend.nproc, "Processes to launch for gloo/nccl (default: world size)")
      ->check(CLI::PositiveNumber);
  sub->add_option("--dump", opt->dump_safetensors,
                  "Write inputs, weights and both aux gradients as float64 safetensors here");
  sub->add_option("--capture", opt->capture_dir,
                  "Also write the mesh's step as a capture (router inputs detached, main loss x 0) into this new "
                  "directory, for `moe-lbcheck verify`");
  sub->callback([opt, &exit_code] { exit_code = runRun(*opt); });
}

}  // namespace moe::cli
