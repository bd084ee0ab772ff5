// moe-lbcheck-inputs: reads one input of moe-lbcheck with exactly the parsing and validation code the
// real CLI runs on it, and nothing else, so that it needs no LibTorch. It is the torch-free driver of
// the bad-input end-to-end tests under the sanitizer build (scripts/sanitize.sh, docs/hardening.md):
//
//   moe-lbcheck-inputs scenario SCENARIO.json   what `run`/`validate` read: the scenario, validated,
//                                               and its data.safetensors file when it names one
//   moe-lbcheck-inputs safetensors FILE         a safetensors file, every header rule and all bytes
//   moe-lbcheck-inputs capture CAPTURE_DIR      what `verify` reads: the rank files, the capture contract
//
// Each takes --report FILE: a short JSON summary of what was read, written (atomically) only when the
// input is valid, as `run --report` is. Errors map to the exit codes and messages of moe-lbcheck
// (cli/error_exit.hpp): bad input exits 2 naming the file and the JSON path or tensor.
#include <iostream>
#include <memory>
#include <string>

#include <nlohmann/json.hpp>

#include "capture/capture.hpp"
#include "cli/error_exit.hpp"
#include "data/problem.hpp"
#include "data/problem_io.hpp"
#include "data/safetensors.hpp"
#include "report/reporters.hpp"
#include "scenario/scenario.hpp"

namespace {

constexpr const char* kProgram = "moe-lbcheck-inputs";

struct InputOptions {
  std::string path;
  std::string report_json;
};

// Prints the summary and writes it to --report when given.
int finish(const InputOptions& opt, const nlohmann::json& summary) {
  if (!opt.report_json.empty()) moe::writeFilesAtomically({{opt.report_json, summary.dump(2) + "\n"}});
  std::cout << "OK " << summary.dump() << "\n";
  return 0;
}

int readScenarioInput(const InputOptions& opt) {
  const moe::Scenario scenario = moe::loadScenarioFile(opt.path);
  nlohmann::json summary = {{"kind", "scenario"}, {"file", opt.path}, {"name", scenario.name}};
  if (!scenario.data.safetensors.empty()) {
    // What `run` does next: the bring-your-own data, checked against the scenario's sizes.
    const moe::ProblemData data = moe::loadProblem(scenario);
    summary["data"] = {{"file", moe::resolveDataPath(scenario)}, {"layers", data.layers}};
  }
  return finish(opt, summary);
}

int readSafetensorsInput(const InputOptions& opt) {
  const moe::SafetensorsFile file = moe::readSafetensorsFile(opt.path);
  return finish(opt, {{"kind", "safetensors"}, {"file", opt.path}, {"tensors", file.tensors.size()}});
}

int readCaptureInput(const InputOptions& opt) {
  const moe::Capture capture = moe::loadCapture(opt.path);
  return finish(opt, {{"kind", "capture"},
                      {"directory", opt.path},
                      {"world_size", capture.world_size},
                      {"layers", capture.layers.size()}});
}

// One subcommand per input kind, each with the input path and --report.
void addInputCommand(CLI::App& app, const char* name, const char* help, const char* path_help,
                     int (*read)(const InputOptions&), int& exit_code) {
  auto opt = std::make_shared<InputOptions>();
  CLI::App* sub = app.add_subcommand(name, help);
  sub->add_option("input", opt->path, path_help)->required();
  sub->add_option("--report", opt->report_json, "Write a JSON summary here when the input is valid");
  sub->callback([opt, read, &exit_code] { exit_code = read(*opt); });
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"moe-lbcheck-inputs: read one input of moe-lbcheck with its own parsing and validation"};
  app.require_subcommand(1);
  app.set_version_flag("--version", std::string(MOE_VERSION));
  int exit_code = 0;
  addInputCommand(app, "scenario", "A scenario file, validated, and the data.safetensors it names",
                  "Scenario JSON file", readScenarioInput, exit_code);
  addInputCommand(app, "safetensors", "A safetensors file (header rules and every tensor's bytes)",
                  "Safetensors file", readSafetensorsInput, exit_code);
  addInputCommand(app, "capture", "A capture directory (rank files and the capture contract)",
                  "Capture directory", readCaptureInput, exit_code);
  return moe::cli::parseAndRun(app, argc, argv, kProgram, "scenario, safetensors or capture", exit_code);
}
