// End-to-end tests of the moe-lbcheck binary: every shipped scenario validates and
// meets its `expect`; bad input and bad usage exit 2 with a message naming the file and the JSON
// path, and leave no partial output; `expect` decides the exit code; --dump writes the documented
// safetensors tensors. The binary runs as a child process (fork/exec) in a fresh temporary directory
// with stdout and stderr captured to files; no assertion depends on wall-clock time.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include "../base/report_checkers.hpp"
#include "scenario/catalog.hpp"
#include "test_support.hpp"

#ifndef MOE_CLI_PATH
#error "MOE_CLI_PATH must name the moe-lbcheck binary"
#endif
#ifndef MOE_SCENARIOS_DIR
#error "MOE_SCENARIOS_DIR must name the scenarios directory"
#endif
#ifndef MOE_SOURCE_DIR
#error "MOE_SOURCE_DIR must name the source directory"
#endif

namespace moe::test {
namespace {

using nlohmann::json;

// ------------------------------------------------------------------------------------------------
// Helpers

json readJson(const fs::path& path) { return json::parse(readText(path)); }

fs::path fixture(const std::string& name) {
  return fs::path(MOE_SOURCE_DIR) / "tests" / "torch" / "data" / name;
}

fs::path quickstartPath() { return fs::path(MOE_SCENARIOS_DIR) / "quickstart.json"; }



struct CliResult {
  int exit_code = -1;  // the exit status, or 128 + signal when killed by a signal
  std::string out, err;
  std::string command;
};

std::ostream& operator<<(std::ostream& os, const CliResult& r) {
  return os << "command: " << r.command << "\nexit code: " << r.exit_code << "\n--- stdout:\n"
            << r.out << "--- stderr:\n"
            << r.err;
}

// Runs `moe-lbcheck args...` with `cwd` as the working directory. stdout and stderr go to files in a
// separate capture directory, so that `cwd` holds only what the tool itself writes.
CliResult runCli(const std::vector<std::string>& args, const fs::path& cwd) {
  CliResult r;
  r.command = MOE_CLI_PATH;
  for (const auto& a : args) r.command += " " + a;

  TempDir capture;
  const std::string out_file = (capture / "stdout").string();
  const std::string err_file = (capture / "stderr").string();
  const std::string cwd_str = cwd.string();
  const std::string exe = MOE_CLI_PATH;

  // Everything the child needs is prepared before fork: it only calls async-signal-safe functions.
  std::vector<std::string> argv_store;
  argv_store.push_back(exe);
  argv_store.insert(argv_store.end(), args.begin(), args.end());
  std::vector<char*> argv;
  for (auto& a : argv_store) argv.push_back(a.data());
  argv.push_back(nullptr);

  const pid_t pid = ::fork();
  if (pid < 0) {
    ADD_FAILURE() << "fork failed: " << std::strerror(errno);
    return r;
  }
  if (pid == 0) {
    if (::chdir(cwd_str.c_str()) != 0) ::_exit(126);
    const int in_fd = ::open("/dev/null", O_RDONLY);
    const int out_fd = ::open(out_file.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    const int err_fd = ::open(err_file.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (in_fd < 0 || out_fd < 0 || err_fd < 0) ::_exit(126);
    if (::dup2(in_fd, 0) < 0 || ::dup2(out_fd, 1) < 0 || ::dup2(err_fd, 2) < 0) ::_exit(126);
    ::execv(exe.c_str(), argv.data());
    ::_exit(127);
  }
  int status = 0;
  pid_t waited;
  do {
    waited = ::waitpid(pid, &status, 0);
  } while (waited < 0 && errno == EINTR);
  if (waited < 0) {
    ADD_FAILURE() << "waitpid failed: " << std::strerror(errno);
    return r;
  }
  if (WIFEXITED(status)) r.exit_code = WEXITSTATUS(status);
  else if (WIFSIGNALED(status)) r.exit_code = 128 + WTERMSIG(status);
  r.out = readText(out_file);
  r.err = readText(err_file);
  return r;
}

// The names of the entries of `dir` (not recursive).
std::set<std::string> listDir(const fs::path& dir) {
  std::set<std::string> names;
  for (const auto& e : fs::directory_iterator(dir)) names.insert(e.path().filename().string());
  return names;
}

// Number of <testcase elements (not <testcases or other prefixes).
int countTestcases(const std::string& xml) {
  int n = 0;
  const std::string tag = "<testcase";
  for (size_t pos = xml.find(tag); pos != std::string::npos; pos = xml.find(tag, pos + 1)) {
    const size_t next = pos + tag.size();
    if (next < xml.size() && (std::isspace(static_cast<unsigned char>(xml[next])) || xml[next] == '>' ||
                              xml[next] == '/'))
      ++n;
  }
  return n;
}

bool isNumberOrNull(const json& v) { return v.is_number() || v.is_null(); }

const std::set<std::string>& diagnosisCodes() {
  static const std::set<std::string> codes = [] {
    const std::vector<std::string> names = diagnosisCodeNames();
    return std::set<std::string>(names.begin(), names.end());
  }();
  return codes;
}

// Structural checks of a report against schema/report.schema.json.
void expectWellFormedReport(const json& report) {
  ASSERT_TRUE(report.is_object());
  const std::vector<std::string> schema_errors = test::schemaErrors(report, "report.schema.json");
  EXPECT_TRUE(schema_errors.empty()) << test::joined(schema_errors);
  for (const char* key : {"schema_version", "kind", "tool", "scenario", "mesh", "verdict", "expectation_met",
                          "checks", "reference", "timing"})
    EXPECT_TRUE(report.contains(key)) << "report lacks top-level key " << key;
  ASSERT_TRUE(report.contains("schema_version"));
  EXPECT_EQ(report["schema_version"], 1);
  if (report.contains("tool")) {
    EXPECT_TRUE(report["tool"].contains("version"));
    EXPECT_TRUE(report["tool"].contains("torch_version"));
    EXPECT_TRUE(report["tool"].contains("features"));
  }
  ASSERT_TRUE(report.contains("verdict"));
  EXPECT_TRUE(report["verdict"] == "pass" || report["verdict"] == "fail") << report["verdict"];
  ASSERT_TRUE(report.contains("expectation_met"));
  EXPECT_TRUE(report["expectation_met"].is_boolean());
  ASSERT_TRUE(report.contains("mesh"));
  for (const char* key : {"dp", "pp", "cp", "microbatches", "world", "backend"})
    EXPECT_TRUE(report["mesh"].contains(key)) << "report.mesh lacks " << key;
  if (report.contains("reference")) {
    for (const char* key : {"method", "step", "fd_error_estimate", "near_ties"})
      EXPECT_TRUE(report["reference"].contains(key)) << "report.reference lacks " << key;
  }

  ASSERT_TRUE(report.contains("checks"));
  ASSERT_TRUE(report["checks"].is_array());
  EXPECT_FALSE(report["checks"].empty());
  std::set<std::string> names;
  bool any_deciding_failed = false;
  for (const json& c : report["checks"]) {
    ASSERT_TRUE(c.is_object());
    for (const char* key : {"name", "ok", "scale", "cosine", "max_abs_err", "max_rel_err", "rtol",
                            "diagnosis"})
      EXPECT_TRUE(c.contains(key)) << "check lacks " << key << ": " << c.dump();
    if (!c.contains("name") || !c["name"].is_string()) {
      ADD_FAILURE() << "check without a string name: " << c.dump();
      continue;
    }
    const std::string name = c["name"];
    SCOPED_TRACE("check " + name);
    EXPECT_FALSE(name.empty());
    EXPECT_TRUE(names.insert(name).second) << "duplicate check name " << name;
    EXPECT_TRUE(c.value("ok", json()).is_boolean());
    for (const char* key : {"scale", "cosine", "max_abs_err", "max_rel_err", "rtol"})
      if (c.contains(key)) EXPECT_TRUE(isNumberOrNull(c[key])) << key << " = " << c[key].dump();
    if (c.contains("diagnosis") && !c["diagnosis"].is_null()) {
      const json& d = c["diagnosis"];
      ASSERT_TRUE(d.is_object()) << d.dump();
      for (const char* key : {"code", "factor", "value", "cause", "fix"})
        EXPECT_TRUE(d.contains(key)) << "diagnosis lacks " << key << ": " << d.dump();
      if (d.contains("code")) {
        ASSERT_TRUE(d["code"].is_string());
        EXPECT_EQ(diagnosisCodes().count(d["code"].get<std::string>()), 1u) << d["code"];
      }
      if (d.contains("factor")) EXPECT_TRUE(d["factor"].is_string());
    }
    const bool informational = c.value("informational", false);
    if (!informational && c.value("ok", true) == false) any_deciding_failed = true;
  }
  // The verdict is "fail" exactly when a check that decides the verdict failed.
  EXPECT_EQ(report["verdict"], any_deciding_failed ? "fail" : "pass");
}

// Does some check carry this diagnosis code (and, when non-empty, this factor) on the same check?
bool someCheckCarries(const json& report, const std::string& code, const std::string& factor) {
  for (const json& c : report["checks"]) {
    if (!c.contains("diagnosis") || !c["diagnosis"].is_object()) continue;
    const json& d = c["diagnosis"];
    if (!code.empty() && d.value("code", "") != code) continue;
    if (!factor.empty() && d.value("factor", "") != factor) continue;
    return true;
  }
  return false;
}

std::string listDiagnoses(const json& report) {
  std::string s;
  for (const json& c : report["checks"]) {
    if (!c.contains("diagnosis") || !c["diagnosis"].is_object()) continue;
    s += " " + c.value("name", "?") + "=" + c["diagnosis"].value("code", "?") + "(" +
         c["diagnosis"].value("factor", "") + ")";
  }
  return s.empty() ? " none" : s;
}

// ------------------------------------------------------------------------------------------------
// 1. Every shipped scenario: validate exits 0, run meets the scenario's expectation (exit 0).

struct ScenarioFile {
  std::string test_name;  // the file stem as a GoogleTest name ([A-Za-z0-9_], unique)
  fs::path path;
};

std::ostream& operator<<(std::ostream& os, const ScenarioFile& s) { return os << s.path.string(); }

// Listed at run time, so that new scenarios are covered without touching this file.
std::vector<ScenarioFile> shippedScenarios() {
  std::vector<fs::path> paths;
  std::error_code ec;
  for (fs::directory_iterator it(MOE_SCENARIOS_DIR, ec), end; !ec && it != end; it.increment(ec)) {
    if (it->is_regular_file() && it->path().extension() == ".json") paths.push_back(it->path());
  }
  std::sort(paths.begin(), paths.end());
  std::vector<ScenarioFile> files;
  std::set<std::string> used;
  for (const fs::path& p : paths) {
    std::string name;
    for (char ch : p.stem().string())
      name += std::isalnum(static_cast<unsigned char>(ch)) ? ch : '_';
    if (name.empty()) name = "scenario";
    std::string unique = name;
    for (int i = 2; !used.insert(unique).second; ++i) unique = name + "_" + std::to_string(i);
    files.push_back({unique, p});
  }
  return files;
}

TEST(CliScenarios, DirectoryHoldsScenarios) {
  const auto files = shippedScenarios();
  EXPECT_FALSE(files.empty()) << "no *.json in " << MOE_SCENARIOS_DIR;
  bool has_quickstart = false;
  for (const auto& f : files) has_quickstart |= f.path.filename() == "quickstart.json";
  EXPECT_TRUE(has_quickstart);
}

// A check's diagnosis code, "" for a check without one (a passing check's diagnosis is null).
std::string diagnosisCode(const json& check) {
  const auto d = check.find("diagnosis");
  return d != check.end() && d->is_object() ? d->value("code", "") : "";
}

const json* checkNamed(const json& report, const std::string& name) {
  for (const json& c : report["checks"])
    if (c.value("name", "") == name) return &c;
  return nullptr;
}

// `verify` of the capture that `run --capture` wrote of the same step reaches run's verdict on the
// checks a capture can hold (aux_grad/layer{l}/router_weight and replicas/layer{l}), the same diagnosis
// code on each aux-gradient check and, on the last layer (no later layer's aux loss reaches it, in
// either), the same scale to 1e-12. What one capture cannot hold is left out: the coefficient-linearity
// check (a second step at 2 alpha) and the main-gradient control (the main loss is multiplied by 0);
// and, for a fault of the gradient path between layers (expected MAIN_GRAD_MISMATCH: the router's
// input gradient under TP or EP), every layer but the last: in run that path also carries later
// layers' aux gradients into earlier routers, which a capture detaches by design.
void expectVerifyOfTheCaptureAgrees(const json& run_report, const fs::path& capture_dir, const fs::path& work,
                                    bool between_layer_fault) {
  ASSERT_TRUE(fs::exists(capture_dir / "rank0.safetensors")) << "run --capture wrote no capture";
  const fs::path verify_path = work / "V.json";
  const CliResult verify = runCli({"verify", capture_dir.string(), "--report", verify_path.string()}, work);
  ASSERT_TRUE(fs::exists(verify_path)) << verify;
  const json v = readJson(verify_path);
  EXPECT_EQ(v["kind"], "verify");

  bool run_fails = false;
  const int layers = run_report["scenario"]["model"]["layers"].get<int>();
  for (int l = between_layer_fault ? layers - 1 : 0; l < layers; ++l) {
    const std::string aux = "aux_grad/layer" + std::to_string(l) + "/router_weight";
    const std::string replicas = "replicas/layer" + std::to_string(l);
    const json* ra = checkNamed(run_report, aux);
    const json* va = checkNamed(v, aux);
    ASSERT_TRUE(ra && va) << aux << " missing";
    EXPECT_EQ((*va)["ok"], (*ra)["ok"]) << aux << ": verify " << va->dump() << "\nrun " << ra->dump();
    EXPECT_EQ(diagnosisCode(*va), diagnosisCode(*ra)) << aux;
    if (l == layers - 1 && (*ra)["scale"].is_number() && (*va)["scale"].is_number()) {
      const double rs = (*ra)["scale"].get<double>(), vs = (*va)["scale"].get<double>();
      EXPECT_LE(std::fabs(vs - rs), 1e-12 * std::max(1.0, std::fabs(rs))) << aux << ": run " << rs << " verify " << vs;
    }
    const json* rr = checkNamed(run_report, replicas);
    const json* vr = checkNamed(v, replicas);
    ASSERT_TRUE(rr && vr) << replicas << " missing";
    EXPECT_EQ((*vr)["ok"], (*rr)["ok"]) << replicas;
    run_fails |= !(*ra)["ok"].get<bool>() || !(*rr)["ok"].get<bool>();
  }
  if (!between_layer_fault) {
    EXPECT_EQ(v["verdict"], run_fails ? "fail" : "pass") << verify;
    EXPECT_EQ(verify.exit_code, run_fails ? 1 : 0) << verify;
  }
}

class CliScenario : public ::testing::TestWithParam<ScenarioFile> {};

TEST_P(CliScenario, ValidatesAndMeetsItsExpectation) {
  const fs::path scenario_path = GetParam().path;
  json scenario;
  ASSERT_NO_THROW(scenario = readJson(scenario_path)) << "shipped scenario is not JSON";
  TempDir dir;

  const CliResult validate = runCli({"validate", scenario_path.string()}, dir.path());
  EXPECT_EQ(validate.exit_code, 0) << validate;

  const fs::path report_path = dir / "R.json", junit_path = dir / "J.xml", capture_dir = dir / "capture";
  const CliResult run = runCli({"run", scenario_path.string(), "--report", report_path.string(), "--junit",
                                junit_path.string(), "--capture", capture_dir.string()},
                               dir.path());
  EXPECT_EQ(run.exit_code, 0) << run;
  EXPECT_TRUE(contains(run.out, "# expectation: met")) << run;

  ASSERT_TRUE(fs::exists(report_path)) << run;
  json report;
  ASSERT_NO_THROW(report = readJson(report_path)) << readText(report_path);
  expectWellFormedReport(report);
  if (::testing::Test::HasFatalFailure()) return;

  // The expectation of the scenario file (absent fields: verdict "pass", any diagnosis/factor).
  const json expect = scenario.value("expect", json::object());
  const std::string verdict = expect.value("verdict", "pass");
  const std::string diagnosis = expect.value("diagnosis", "");
  const std::string factor = expect.value("factor", "");
  EXPECT_EQ(report["verdict"], verdict);
  EXPECT_EQ(report["expectation_met"], true) << report.value("expectation_detail", "");
  if (!diagnosis.empty() || !factor.empty())
    EXPECT_TRUE(someCheckCarries(report, diagnosis, factor))
        << "expected a check with diagnosis " << diagnosis << " factor '" << factor
        << "'; got" << listDiagnoses(report);

  // The mesh of the report is the scenario's (defaults 1 for absent fields).
  const json mesh = scenario.value("mesh", json::object());
  const int dp = mesh.value("dp", 1), pp = mesh.value("pp", 1), cp = mesh.value("cp", 1);
  const int tp = mesh.value("tp", 1), ep = mesh.value("ep", 1);
  const int microbatches = mesh.value("microbatches", 1);
  EXPECT_EQ(report["mesh"]["dp"], dp);
  EXPECT_EQ(report["mesh"]["pp"], pp);
  EXPECT_EQ(report["mesh"]["cp"], cp);
  EXPECT_EQ(report["mesh"]["tp"], tp);
  EXPECT_EQ(report["mesh"]["ep"], ep);
  EXPECT_EQ(report["mesh"]["microbatches"], microbatches);
  EXPECT_EQ(report["mesh"]["world"], tp * dp * pp * cp);  // EP is carved out of these ranks
  EXPECT_EQ(report["mesh"]["backend"], "emulated");
  // The resolved scenario is echoed with the same mesh.
  if (report["scenario"].contains("mesh")) {
    EXPECT_EQ(report["scenario"]["mesh"].value("dp", -1), dp);
    EXPECT_EQ(report["scenario"]["mesh"].value("microbatches", -1), microbatches);
  }
  EXPECT_EQ(report["scenario"].value("name", ""), scenario.value("name", "?"));

  // JUnit: one testcase per check.
  ASSERT_TRUE(fs::exists(junit_path)) << run;
  const std::string xml = readText(junit_path);
  EXPECT_TRUE(contains(xml, "<testsuite"));
  EXPECT_EQ(countTestcases(xml), static_cast<int>(report["checks"].size()));

  expectVerifyOfTheCaptureAgrees(report, capture_dir, dir.path(), diagnosis == "MAIN_GRAD_MISMATCH");
}

INSTANTIATE_TEST_SUITE_P(Cli, CliScenario, ::testing::ValuesIn(shippedScenarios()),
                         [](const ::testing::TestParamInfo<ScenarioFile>& info) {
                           return info.param.test_name;
                         });
GTEST_ALLOW_UNINSTANTIATED_PARAMETERIZED_TEST(CliScenario);

// ------------------------------------------------------------------------------------------------
// 2. Exit codes and messages for bad input and bad usage.

// A failing `run` given --report/--junit/--dump must leave the directory as it was.
void expectNoOutputs(const TempDir& dir, const std::set<std::string>& before, const CliResult& r) {
  EXPECT_FALSE(fs::exists(dir / "R.json")) << "partial output: report written\n" << r;
  EXPECT_FALSE(fs::exists(dir / "J.xml")) << "partial output: JUnit written\n" << r;
  EXPECT_FALSE(fs::exists(dir / "D.safetensors")) << "partial output: dump written\n" << r;
  EXPECT_EQ(listDir(dir.path()), before) << "the failed run left files behind\n" << r;
}

// `run FILE extra... --report R.json --junit J.xml --dump D.safetensors` in `dir`.
CliResult runWithOutputs(const TempDir& dir, const std::string& file,
                         const std::vector<std::string>& extra = {}) {
  std::vector<std::string> args = {"run", file};
  args.insert(args.end(), extra.begin(), extra.end());
  for (const char* a : {"--report", "R.json", "--junit", "J.xml", "--dump", "D.safetensors"})
    args.emplace_back(a);
  return runCli(args, dir.path());
}

// One bad `run` with --report/--junit/--dump: how its scenario file is made in the test's directory,
// the extra arguments, and what stderr must name. Every row exits 2 and leaves no output behind.
struct BadRunCase {
  const char* name;
  std::function<fs::path(const TempDir&)> scenario;
  std::vector<std::string> extra;
  std::vector<std::string> stderr_names;
};

std::function<fs::path(const TempDir&)> fixtureFile(const char* name) {
  return [name](const TempDir&) { return fixture(name); };
}
fs::path quickstartFile(const TempDir&) { return quickstartPath(); }

const std::vector<BadRunCase>& badRunCases() {
  static const std::vector<BadRunCase> cases = {
      {"MissingScenarioFile",
       [](const TempDir& dir) { return dir / "no_such_scenario.json"; },
       {},
       {"no_such_scenario.json"}},
      {"InvalidJson", fixtureFile("cli_invalid_json.json"), {}, {"cli_invalid_json.json"}},
      {"UnknownKeyNamesTheJsonPath", fixtureFile("cli_unknown_key.json"), {}, {"cli_unknown_key.json", "/aux/coef"}},
      {"CrossFieldErrorNamesTheJsonPath",
       fixtureFile("cli_topk_exceeds_experts.json"),
       {},
       {"cli_topk_exceeds_experts.json", "/model/top_k"}},
      // The unknown-key rule on a copy of the shipped quickstart, at the top level.
      {"UnknownKeyGeneratedFromQuickstart",
       [](const TempDir& dir) {
         json sc = readJson(quickstartPath());
         sc["expected"] = json::object();
         writeText(dir / "typo.json", sc.dump(2));
         return dir / "typo.json";
       },
       {},
       {"/expected"}},
      {"UnknownFlag", quickstartFile, {"--no-such-flag"}, {"--no-such-flag"}},
      {"MalformedMesh", quickstartFile, {"--mesh", "dp=x"}, {"--mesh"}},
      {"MeshThatDoesNotDivideTheBatchNamesDataBatch",
       [](const TempDir&) {
         EXPECT_EQ(readJson(quickstartPath())["data"]["batch"], 4) << "the row assumes quickstart's batch of 4";
         return quickstartPath();
       },
       {"--mesh", "dp=3"},
       {"/data/batch", "quickstart.json"}},
      {"UnknownPreset", quickstartFile, {"--preset", "nope"}, {"nope"}},
      {"UnknownFault", quickstartFile, {"--fault", "nope"}, {"nope"}},
  };
  return cases;
}

class CliBadRun : public ::testing::TestWithParam<BadRunCase> {};

TEST_P(CliBadRun, Exits2NamingTheInputAndLeavesNoOutputs) {
  const BadRunCase& row = GetParam();
  TempDir dir;
  const fs::path file = row.scenario(dir);
  const auto before = listDir(dir.path());
  const CliResult r = runWithOutputs(dir, file.string(), row.extra);
  EXPECT_EQ(r.exit_code, 2) << r;
  for (const std::string& name : row.stderr_names) EXPECT_TRUE(contains(r.err, name)) << name << "\n" << r;
  expectNoOutputs(dir, before, r);
}

INSTANTIATE_TEST_SUITE_P(CliErrors, CliBadRun, ::testing::ValuesIn(badRunCases()),
                         [](const ::testing::TestParamInfo<BadRunCase>& info) { return std::string(info.param.name); });

TEST(CliErrors, UnknownSubcommandExits2) {
  TempDir dir;
  const CliResult r = runCli({"frobnicate", quickstartPath().string()}, dir.path());
  EXPECT_EQ(r.exit_code, 2) << r;
  EXPECT_TRUE(contains(r.err, "unknown subcommand 'frobnicate'")) << r;
}

TEST(CliErrors, MissingArgumentsExit2) {
  TempDir dir;
  const std::vector<std::vector<std::string>> invocations = {
      {},                                             // no subcommand
      {"run"},                                        // no scenario
      {"validate"},                                   // no file
      {"list"},                                       // no catalog
      {"list", "nope"},                               // no such catalog
      {"run", quickstartPath().string(), "--report"}  // no value
  };
  for (const std::vector<std::string>& args : invocations) {
    const CliResult r = runCli(args, dir.path());
    EXPECT_EQ(r.exit_code, 2) << r;
  }
  EXPECT_TRUE(listDir(dir.path()).empty());
}

TEST(CliErrors, UnwritableOutputPathLeavesNoOtherOutput) {
  // A failure while writing the outputs must not leave a partial set of them behind: the output
  // flags of `run`, one of them into a directory that does not exist, and the files that must not
  // have been written.
  struct Row {
    std::vector<std::string> outputs;
    std::vector<std::string> not_written;
  };
  const std::vector<Row> rows = {
      {{"--report", "R.json", "--junit", "no_such_dir/J.xml"}, {"R.json"}},
      {{"--report", "R.json", "--junit", "J.xml", "--dump", "no_such_dir/D.safetensors"}, {"R.json", "J.xml"}},
  };
  for (const Row& row : rows) {
    TempDir dir;
    const auto before = listDir(dir.path());
    std::vector<std::string> args = {"run", quickstartPath().string()};
    args.insert(args.end(), row.outputs.begin(), row.outputs.end());
    const CliResult r = runCli(args, dir.path());
    EXPECT_NE(r.exit_code, 0) << r;
    EXPECT_NE(r.exit_code, 1) << r;
    EXPECT_TRUE(contains(r.err, "no_such_dir")) << r;
    for (const std::string& name : row.not_written)
      EXPECT_FALSE(fs::exists(dir / name)) << "partial output: " << name << " written\n" << r;
    EXPECT_EQ(listDir(dir.path()), before) << r;
  }
}

TEST(CliErrors, ValidateReportsEveryFileAndExits2OnAnyInvalid) {
  TempDir dir;
  const std::vector<std::string> files = {
      quickstartPath().string(), fixture("cli_invalid_json.json").string(),
      fixture("cli_unknown_key.json").string(), fixture("cli_topk_exceeds_experts.json").string(),
      (dir / "missing.json").string()};
  std::vector<std::string> args = {"validate"};
  args.insert(args.end(), files.begin(), files.end());
  const CliResult r = runCli(args, dir.path());
  EXPECT_EQ(r.exit_code, 2) << r;
  const std::string all = r.out + r.err;
  for (const auto& f : files) EXPECT_TRUE(contains(all, fs::path(f).filename().string())) << f << "\n" << r;
  EXPECT_TRUE(contains(all, "/aux/coef")) << r;
  EXPECT_TRUE(contains(all, "/model/top_k")) << r;

  // All valid: exit 0.
  const CliResult ok = runCli({"validate", quickstartPath().string()}, dir.path());
  EXPECT_EQ(ok.exit_code, 0) << ok;
}

TEST(CliUsage, HelpExits0) {
  TempDir dir;
  const CliResult top = runCli({"--help"}, dir.path());
  EXPECT_EQ(top.exit_code, 0) << top;
  for (const char* sub : {"run", "validate", "list"}) EXPECT_TRUE(contains(top.out, sub)) << top;
  for (const std::vector<std::string>& args :
       std::vector<std::vector<std::string>>{{"run", "--help"}, {"validate", "--help"}}) {
    const CliResult r = runCli(args, dir.path());
    EXPECT_EQ(r.exit_code, 0) << r;
    EXPECT_FALSE(r.out.empty()) << r;
  }
  EXPECT_TRUE(listDir(dir.path()).empty());
}

// The entries of `list`: lines that start in column 0 (continuation lines are indented).
std::vector<std::string> listedNames(const std::string& text) {
  std::vector<std::string> names;
  std::istringstream in(text);
  std::string line;
  while (std::getline(in, line)) {
    if (line.empty() || std::isspace(static_cast<unsigned char>(line[0])) || line[0] == '#') continue;
    names.push_back(line.substr(0, line.find_first_of(" \t")));
  }
  return names;
}

int countOccurrences(const std::string& text, const std::string& needle) {
  int n = 0;
  for (size_t pos = text.find(needle); pos != std::string::npos; pos = text.find(needle, pos + 1)) ++n;
  return n;
}

TEST(CliList, PresetsOneEntryPerCatalogItem) {
  TempDir dir;
  const CliResult r = runCli({"list", "presets"}, dir.path());
  EXPECT_EQ(r.exit_code, 0) << r;
  std::vector<std::string> expected;
  for (const PresetRecord& p : presetCatalog()) expected.push_back(p.name);
  EXPECT_EQ(listedNames(r.out), expected) << r;
  for (const PresetRecord& p : presetCatalog()) EXPECT_TRUE(contains(r.out, p.source)) << p.name;
  EXPECT_EQ(countOccurrences(r.out, "source:"), static_cast<int>(presetCatalog().size())) << r;
}

TEST(CliList, FaultsOneEntryPerCatalogItem) {
  TempDir dir;
  const CliResult r = runCli({"list", "faults"}, dir.path());
  EXPECT_EQ(r.exit_code, 0) << r;
  std::vector<std::string> expected;
  for (const FaultRecord& f : faultCatalog()) expected.push_back(f.name);
  EXPECT_EQ(listedNames(r.out), expected) << r;
  for (const FaultRecord& f : faultCatalog()) {
    EXPECT_TRUE(contains(r.out, f.source)) << f.name;
    EXPECT_TRUE(contains(r.out, toString(f.expected_diagnosis))) << f.name;
  }
  EXPECT_EQ(countOccurrences(r.out, "source:"), static_cast<int>(faultCatalog().size())) << r;
}

// ------------------------------------------------------------------------------------------------
// 3. `expect` decides the exit code.

struct ExpectRun {
  CliResult result;
  json report;  // null when no report was written
};

ExpectRun runVariant(const TempDir& dir, const json& scenario, const std::vector<std::string>& extra = {}) {
  const fs::path file = dir / "variant.json";
  writeText(file, scenario.dump(2));
  std::vector<std::string> args = {"run", file.string(), "--report", "R.json", "--junit", "J.xml"};
  args.insert(args.end(), extra.begin(), extra.end());
  ExpectRun er;
  er.result = runCli(args, dir.path());
  if (fs::exists(dir / "R.json")) {
    try {
      er.report = readJson(dir / "R.json");
    } catch (const std::exception& e) {
      ADD_FAILURE() << "report is not JSON: " << e.what();
    }
  }
  return er;
}

TEST(CliExpect, PassingScenarioExpectedToFailExits1) {
  TempDir dir;
  json sc = readJson(quickstartPath());
  ASSERT_EQ(sc["expect"]["verdict"], "pass");
  sc["expect"] = {{"verdict", "fail"}};
  const ExpectRun r = runVariant(dir, sc);
  EXPECT_EQ(r.result.exit_code, 1) << r.result;
  ASSERT_TRUE(r.report.is_object()) << "no report written for a run whose expectation was not met\n"
                                    << r.result;
  EXPECT_EQ(r.report["verdict"], "pass");
  EXPECT_EQ(r.report["expectation_met"], false);
  EXPECT_TRUE(contains(r.result.out, "# expectation: not met")) << r.result;
  EXPECT_TRUE(fs::exists(dir / "J.xml"));
}

TEST(CliExpect, FaultWithMatchingDiagnosisAndFactorExits0) {
  TempDir dir;
  json sc = readJson(quickstartPath());
  sc["faults"] = {"discard_apply_return"};
  sc["expect"] = {{"verdict", "fail"}, {"diagnosis", "AUX_GRAD_MISSING"}, {"factor", "0"}};
  const ExpectRun r = runVariant(dir, sc);
  EXPECT_EQ(r.result.exit_code, 0) << r.result;
  ASSERT_TRUE(r.report.is_object()) << r.result;
  expectWellFormedReport(r.report);
  EXPECT_EQ(r.report["verdict"], "fail");
  EXPECT_EQ(r.report["expectation_met"], true) << r.report.value("expectation_detail", "");
  EXPECT_TRUE(someCheckCarries(r.report, "AUX_GRAD_MISSING", "0")) << listDiagnoses(r.report);
  EXPECT_EQ(countTestcases(readText(dir / "J.xml")), static_cast<int>(r.report["checks"].size()));
}

TEST(CliExpect, FaultWithWrongFactorExits1) {
  TempDir dir;
  json sc = readJson(quickstartPath());
  sc["faults"] = {"discard_apply_return"};
  sc["expect"] = {{"verdict", "fail"}, {"diagnosis", "AUX_GRAD_MISSING"}, {"factor", "1/dp"}};
  const ExpectRun r = runVariant(dir, sc);
  EXPECT_EQ(r.result.exit_code, 1) << r.result;
  ASSERT_TRUE(r.report.is_object()) << r.result;
  EXPECT_EQ(r.report["verdict"], "fail");
  EXPECT_EQ(r.report["expectation_met"], false);
}

TEST(CliExpect, FaultFromTheCommandLineWithoutChangingExpectExits1) {
  TempDir dir;
  const CliResult r = runCli({"run", quickstartPath().string(), "--fault", "discard_apply_return",
                              "--report", "R.json"},
                             dir.path());
  EXPECT_EQ(r.exit_code, 1) << r;
  ASSERT_TRUE(fs::exists(dir / "R.json")) << r;
  const json report = readJson(dir / "R.json");
  EXPECT_EQ(report["verdict"], "fail");
  EXPECT_EQ(report["expectation_met"], false);
  // The fault's catalog signature is what the tool reports.
  const FaultRecord* info = &faultRecord(Fault::kDiscardApplyReturn);
  ASSERT_NE(info, nullptr);
  EXPECT_TRUE(someCheckCarries(report, toString(info->expected_diagnosis), info->expected_factor))
      << listDiagnoses(report);
  // The fault is echoed in the resolved scenario.
  ASSERT_TRUE(report["scenario"].contains("faults"));
  EXPECT_NE(std::find(report["scenario"]["faults"].begin(), report["scenario"]["faults"].end(),
                      "discard_apply_return"),
            report["scenario"]["faults"].end());
}

// ------------------------------------------------------------------------------------------------
// 4. --dump writes the problem and both gradients as safetensors.

struct HeaderEntry {
  std::string dtype;
  std::vector<std::int64_t> shape;
  std::uint64_t begin = 0, end = 0;
};

TEST(CliDump, SafetensorsHeaderListsProblemAndGradients) {
  TempDir dir;
  const json sc = readJson(quickstartPath());
  const std::int64_t B = sc["data"]["batch"], S = sc["data"]["seq_len"], H = sc["model"]["hidden"],
                     E = sc["model"]["experts"];
  const int layers = sc["model"]["layers"];
  const CliResult r = runCli({"run", quickstartPath().string(), "--dump", "out.safetensors"}, dir.path());
  EXPECT_EQ(r.exit_code, 0) << r;
  const fs::path dump = dir / "out.safetensors";
  ASSERT_TRUE(fs::exists(dump)) << r;

  const std::string bytes = readText(dump);
  ASSERT_GE(bytes.size(), 8u);
  std::uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | static_cast<unsigned char>(bytes[i]);
  ASSERT_LE(8 + n, bytes.size()) << "header length " << n << " beyond the file";
  json header;
  ASSERT_NO_THROW(header = json::parse(bytes.substr(8, n))) << bytes.substr(8, std::min<std::uint64_t>(n, 500));
  ASSERT_TRUE(header.is_object());
  const std::uint64_t data_size = bytes.size() - 8 - n;

  std::map<std::string, HeaderEntry> entries;
  for (auto it = header.begin(); it != header.end(); ++it) {
    if (it.key() == "__metadata__") continue;
    HeaderEntry e;
    ASSERT_NO_THROW({
      e.dtype = it.value().at("dtype").get<std::string>();
      e.shape = it.value().at("shape").get<std::vector<std::int64_t>>();
      e.begin = it.value().at("data_offsets").at(0).get<std::uint64_t>();
      e.end = it.value().at("data_offsets").at(1).get<std::uint64_t>();
    }) << it.key() << ": " << it.value().dump();
    std::uint64_t count = 1;
    for (auto d : e.shape) count *= static_cast<std::uint64_t>(d);
    const std::uint64_t item = e.dtype == "F64" ? 8 : e.dtype == "F32" ? 4 : (e.dtype == "U8" || e.dtype == "BOOL") ? 1 : 0;
    EXPECT_NE(item, 0u) << it.key() << " dtype " << e.dtype;
    EXPECT_LE(e.begin, e.end) << it.key();
    EXPECT_LE(e.end, data_size) << it.key();
    EXPECT_EQ(e.end - e.begin, count * item) << it.key();
    entries[it.key()] = e;
  }

  const std::map<std::string, std::vector<std::int64_t>> expected = {
      {"x", {B, S, H}},
      {"y", {B, S, H}},
      {"valid", {B, S}},
      {"layer0.router_weight", {H, E}},
      {"grad.reference.layer0.router_weight", {H, E}},
      {"grad.mesh.layer0.router_weight", {H, E}},
  };
  for (const auto& [name, shape] : expected) {
    ASSERT_EQ(entries.count(name), 1u) << "dump lacks " << name << "; header: " << header.dump();
    EXPECT_EQ(entries[name].shape, shape) << name;
    if (name != "valid") EXPECT_EQ(entries[name].dtype, "F64") << name;
  }
  EXPECT_TRUE(entries["valid"].dtype == "U8" || entries["valid"].dtype == "BOOL") << entries["valid"].dtype;
  for (int l = 1; l < layers; ++l) {
    for (const std::string prefix : {"", "grad.reference.", "grad.mesh."}) {
      const std::string name = prefix + "layer" + std::to_string(l) + ".router_weight";
      ASSERT_EQ(entries.count(name), 1u) << "dump lacks " << name;
      EXPECT_EQ(entries[name].shape, (std::vector<std::int64_t>{H, E})) << name;
    }
  }

  // quickstart passes: the dumped mesh gradient equals the reference one to well within rtol 1e-7.
  auto values = [&](const HeaderEntry& e) {
    std::vector<double> v((e.end - e.begin) / 8);
    std::memcpy(v.data(), bytes.data() + 8 + n + e.begin, v.size() * 8);  // little-endian host
    return v;
  };
  const std::vector<double> ref = values(entries["grad.reference.layer0.router_weight"]);
  const std::vector<double> mesh = values(entries["grad.mesh.layer0.router_weight"]);
  ASSERT_EQ(ref.size(), mesh.size());
  double max_ref = 0, max_diff = 0;
  for (size_t i = 0; i < ref.size(); ++i) {
    ASSERT_TRUE(std::isfinite(ref[i]) && std::isfinite(mesh[i])) << i;
    max_ref = std::max(max_ref, std::fabs(ref[i]));
    max_diff = std::max(max_diff, std::fabs(ref[i] - mesh[i]));
  }
  EXPECT_GT(max_ref, 0.0);
  EXPECT_LE(max_diff, 1e-7 * max_ref);
  // No stray temporary files next to the dump.
  EXPECT_EQ(listDir(dir.path()), (std::set<std::string>{"out.safetensors"}));
}

}  // namespace
}  // namespace moe::test

// ------------------------------------------------------------------------------------------------
// 5. Defects fixed by the redesign, each with its test.

namespace moe::test {
namespace {

TEST(CliDefects, NumberBeyondDoubleExits2NamingFileAndPath) {
  TempDir dir;
  const fs::path file = dir / "overflow.json";
  writeText(file, R"({"schema_version": 1, "name": "overflow", "aux": {"coeff": 1e400}})");
  const auto before = listDir(dir.path());
  const CliResult r = runWithOutputs(dir, file.string());
  EXPECT_EQ(r.exit_code, 2) << r;
  EXPECT_TRUE(contains(r.err, "overflow.json: /aux/coeff")) << r;
  expectNoOutputs(dir, before, r);
  EXPECT_EQ(runCli({"validate", file.string()}, dir.path()).exit_code, 2);
}

TEST(CliDefects, ValidateRefusesAFaultThePresetCannotExpressLikeRun) {
  TempDir dir;
  json sc = readJson(quickstartPath());
  sc["framework"]["preset"] = "torchtitan";
  sc["faults"] = {"world_size_multiply"};
  const fs::path file = dir / "inexpressible.json";
  writeText(file, sc.dump(2));
  const CliResult validate = runCli({"validate", file.string()}, dir.path());
  const CliResult run = runCli({"run", file.string()}, dir.path());
  EXPECT_EQ(validate.exit_code, 2) << validate;
  EXPECT_EQ(run.exit_code, 2) << run;
  EXPECT_TRUE(contains(validate.out, "/faults/0")) << validate;
  EXPECT_TRUE(contains(run.err, "/faults/0")) << run;
}

// A torchtitan scenario with unequal padding: the preset weighs the groups by their tokens.
json tokenWeightedScenario() {
  json sc = readJson(quickstartPath());
  sc["name"] = "torchtitan-unequal";
  sc["framework"]["preset"] = "torchtitan";
  sc["mesh"] = {{"dp", 2}, {"microbatches", 2}};
  sc["data"]["batch"] = 4;
  sc["data"]["valid_lengths"] = {16, 5, 12, 9};
  sc["aux"]["z_loss_coeff"] = 0.0;
  sc["aux"].erase("group_weighting");
  return sc;
}

TEST(CliDefects, ReportEchoesTheGroupWeightingTheReferenceUsed) {
  TempDir dir;
  json sc = tokenWeightedScenario();
  const ExpectRun r = runVariant(dir, sc);
  ASSERT_EQ(r.result.exit_code, 0) << r.result;
  EXPECT_EQ(r.report["scenario"]["aux"]["group_weighting"], "tokens");  // resolved, never "preset"
  sc["framework"]["preset"] = "megatron";
  const ExpectRun m = runVariant(dir, sc);
  ASSERT_EQ(m.result.exit_code, 0) << m.result;
  EXPECT_EQ(m.report["scenario"]["aux"]["group_weighting"], "uniform");
}

TEST(CliDefects, TokenWeightingThroughThePresetIsReportedAsAFinding) {
  TempDir dir;
  const ExpectRun r = runVariant(dir, tokenWeightedScenario());
  ASSERT_EQ(r.result.exit_code, 0) << r.result;
  EXPECT_EQ(r.report["verdict"], "pass");
  const json* finding = nullptr;
  for (const json& c : r.report["checks"])
    if (c["name"] == "objective/group_weighting") finding = &c;
  ASSERT_NE(finding, nullptr) << r.result;
  EXPECT_EQ((*finding)["informational"], true);
  EXPECT_EQ((*finding)["diagnosis"]["code"], "OBJECTIVE_WEIGHTING");
  // Against the uniform mean the token-weighted gradient is neither the same scale nor direction.
  EXPECT_LT((*finding)["cosine"].get<double>(), 1.0 - 1e-9);
  EXPECT_TRUE(contains((*finding)["diagnosis"]["cause"].get<std::string>(), "torchtitan"));

  // Equal groups, or the weighting pinned by the scenario: no finding.
  json equal = tokenWeightedScenario();
  equal["data"]["valid_lengths"] = {16, 16, 16, 16};
  json pinned = tokenWeightedScenario();
  pinned["aux"]["group_weighting"] = "tokens";
  for (const json& sc : {equal, pinned}) {
    const ExpectRun q = runVariant(dir, sc);
    ASSERT_EQ(q.result.exit_code, 0) << q.result;
    for (const json& c : q.report["checks"]) EXPECT_NE(c["name"], "objective/group_weighting") << sc.dump();
  }
}

}  // namespace
}  // namespace moe::test
