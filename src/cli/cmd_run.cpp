// `moe-lbcheck run SCENARIO.json [options]`: check one scenario on one mesh.
#include <algorithm>
#include <cstdio>
#include <iostream>
#include <memory>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

#include "app/check_run.hpp"
#include "cli/commands.hpp"
#include "cli/overrides.hpp"
#include "common/errors.hpp"
#include "data/problem_io.hpp"
#include "report/reporters.hpp"
#include "cuda/nccl_communicator.hpp"
#include "sim/distributed_runner.hpp"  // [issue 4: backend gloo]

namespace moe::cli {

struct RunOptions {
  std::string scenario;
  ScenarioOverrides overrides;
  std::string backend = "emulated";
  int nproc = 0;  // 0 = the mesh's world size
  std::string report_json;
  std::string junit_xml;
  std::string dump_safetensors;
  bool quiet = false;
};

int runRun(const RunOptions& opt) {
  Scenario sc = loadScenarioFile(opt.scenario);
  applyOverrides(sc, opt.overrides);
  if (opt.nproc != 0 && opt.backend == "emulated")
    throw UsageError("--nproc applies to --backend gloo|nccl only");
  // [issue 4: backend gloo] One process per rank (src/sim/launcher.hpp, distributed_runner.hpp):
  // start the ranks here, or be one rank; rank 0 re-enters runRun inside the session and does the
  // rest of this function, the other ranks only serve its mesh runs and write nothing.
  const bool real_backend = opt.backend == "gloo" || opt.backend == "nccl";
  if (opt.backend == "nccl") requireCudaDevice(-1);  // fails clearly (exit 3) without a usable GPU
  if (real_backend && DistributedSession::current() == nullptr) {
    if (std::optional<RankEnvironment> env = detectRankEnvironment(opt.nproc)) {
      env->backend = opt.backend;
      checkRankEnvironment(*env, sc, opt.nproc);
      return runDistributedRank(*env, sc, [&opt] { return runRun(opt); });
    }
    return launchLocalRanks(sc, opt.nproc != 0 ? opt.nproc : sc.mesh.dp * sc.mesh.pp * sc.mesh.cp);
  }
  CheckRunOptions run_options;
  run_options.backend = opt.backend;
  CheckRunOutput out = runChecks(sc, run_options);

  // Render everything first, then write: a failure never leaves a partial set of outputs.
  ConsoleReporter console(ConsoleOptions{opt.quiet});
  const std::string console_text = renderToString(console, out.report);
  std::string json_text, junit_text;
  if (!opt.report_json.empty()) json_text = renderToString(JsonReporter(), out.report);
  if (!opt.junit_xml.empty()) junit_text = renderToString(JUnitReporter(), out.report);
  const std::vector<std::string> written =
      writeFilesAtomically({{opt.report_json, json_text}, {opt.junit_xml, junit_text}});
  try {
    if (!opt.dump_safetensors.empty())
      dumpProblemAndGradients(opt.dump_safetensors, out.data, out.reference_aux_grad, out.mesh_aux_grad);
  } catch (...) {
    for (const std::string& path : written) std::remove(path.c_str());  // no partial set of outputs
    throw;
  }
  std::cout << console_text << std::flush;
  return out.report.expectation_met ? 0 : static_cast<int>(ExitCode::kCheckFailed);
}

void setupRunCommand(CLI::App& app, int& exit_code) {
  auto opt = std::make_shared<RunOptions>();
  CLI::App* sub = app.add_subcommand("run", "Check one scenario's aux-loss gradient on one mesh");
  sub->add_option("scenario", opt->scenario, "Scenario JSON file")->required();
  addOverrideOptions(*sub, opt->overrides);
  sub->add_option("--backend", opt->backend, "Mesh backend")
      ->check(CLI::IsMember({"emulated", "gloo", "nccl"}))
      ->capture_default_str();
  sub->add_option("--nproc", opt->nproc, "Processes to launch for gloo/nccl (default: world size)")
      ->check(CLI::PositiveNumber);
  sub->add_option("--report", opt->report_json, "Write the JSON report (schema_version 1) here");
  sub->add_option("--junit", opt->junit_xml, "Write JUnit XML (one testcase per check) here");
  sub->add_option("--dump", opt->dump_safetensors,
                  "Write inputs, weights and both aux gradients as float64 safetensors here");
  sub->add_flag("-q,--quiet", opt->quiet, "Print only failures and the footer");
  sub->callback([opt, &exit_code] { exit_code = runRun(*opt); });
}

}  // namespace moe::cli
