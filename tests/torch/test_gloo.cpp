// Backend gloo: the Communicator seam over c10d ProcessGroupGloo, one process per rank.
//
// - Agreement: every shipped scenario, and 2-, 4- and 8-rank meshes of small scenarios, run with
//   `moe-lbcheck run --backend gloo` (the tool's own launcher); rank 0 dumps the gathered gradients
//   of every mesh run (test hook MOE_LBCHECK_TEST_DUMP_MESH_RUNS) and the test runs the same mesh
//   runs in-process with the emulated backend: the max relative difference (max |g - e| / max |e| per
//   layer) is printed and must be <= 1e-12; the verdict and every check's outcome must equal those of
//   the emulated CLI run.
// - Faults of the system: a rank that exits, crashes or hangs (test hooks
//   MOE_LBCHECK_TEST_{EXIT,CRASH,HANG}_RANK) makes the launcher return 3 with a summary naming the
//   rank, every surviving rank names its failed operation, and no process is left behind (checked by
//   a token in the ranks' environment, looked for in /proc).
// - Environment: torchrun-, srun- and mpirun-style variables with the ranks started by the test;
//   a wrong WORLD_SIZE, a missing MASTER_ADDR or MASTER_PORT, a port in use, RANK without WORLD_SIZE,
//   --nproc that disagrees with the mesh: exit 2 with a message naming the variable.
// The ranks are child processes (fork/exec of the binary at MOE_CLI_PATH) with stdout and stderr
// captured to files. Timeouts (MOE_LBCHECK_TIMEOUT_S, and the test's own watchdog that kills
// children left after several minutes) only end runs that would otherwise never end; no assertion
// depends on wall-clock time.
#include <gtest/gtest.h>

#include "test_support.hpp"

#include <arpa/inet.h>
#include <dirent.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <optional>
#include <random>
#include <set>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include <nlohmann/json.hpp>

#include "common/errors.hpp"
#include "data/problem.hpp"
#include "scenario/scenario.hpp"
#include "sim/c10d_communicator.hpp"
#include "sim/launcher.hpp"
#include "sim/emulated_backend.hpp"
#include "sim/rank_program.hpp"

#if !defined(MOE_CLI_PATH) || !defined(MOE_SCENARIOS_DIR)
#error "MOE_CLI_PATH and MOE_SCENARIOS_DIR must name the moe-lbcheck binary and the scenarios directory"
#endif

extern char** environ;

namespace moe::test {
namespace {

using nlohmann::json;

constexpr double kAgreementTolerance = 1e-12;

// ------------------------------------------------------------------------------------------------
// Helpers




std::string uniqueToken() {
  std::random_device rd;
  return std::to_string(::getpid()) + "-" + std::to_string(rd()) + std::to_string(rd());
}

// Variables of launchers and of this tool, removed from the children's environment so that the CI
// environment (which may itself run under srun or mpirun) cannot change what a test runs.
bool isLauncherVariable(const std::string& name) {
  static const std::set<std::string> exact = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE",
                                              "MASTER_ADDR", "MASTER_PORT", "GLOO_SOCKET_IFNAME"};
  return exact.count(name) > 0 || name.rfind("OMPI_", 0) == 0 || name.rfind("SLURM_", 0) == 0 ||
         name.rfind("PMI", 0) == 0 || name.rfind("MOE_LBCHECK_", 0) == 0;
}

using EnvOverrides = std::map<std::string, std::string>;

struct Process {
  pid_t pid = -1;
  fs::path out, err;
  std::string command;
};

struct ProcessResult {
  int exit_code = -1;  // the exit status, or 128 + signal
  int signal = 0;      // the signal that ended the process, 0 when it exited
  std::string out, err, command;
};

std::ostream& operator<<(std::ostream& os, const ProcessResult& r) {
  return os << "command: " << r.command << "\nexit code: " << r.exit_code << "\n--- stdout:\n"
            << r.out << "--- stderr:\n"
            << r.err;
}

// Starts `moe-lbcheck args...` in `cwd` with the sanitized environment plus `env`; stdout and stderr
// go to `capture`/<name>.out|err.
Process spawnCli(const std::vector<std::string>& args, const EnvOverrides& env, const fs::path& cwd,
                 const fs::path& capture, const std::string& name) {
  Process p;
  p.out = capture / (name + ".out");
  p.err = capture / (name + ".err");
  p.command = MOE_CLI_PATH;
  for (const auto& a : args) p.command += " " + a;
  for (const auto& [k, v] : env) p.command = k + "=" + v + " " + p.command;

  std::vector<std::string> argv_store{MOE_CLI_PATH};
  argv_store.insert(argv_store.end(), args.begin(), args.end());
  std::vector<std::string> env_store;
  for (char** e = environ; *e != nullptr; ++e) {
    const std::string entry(*e);
    if (!isLauncherVariable(entry.substr(0, entry.find('=')))) env_store.push_back(entry);
  }
  for (const auto& [k, v] : env) env_store.push_back(k + "=" + v);
  std::vector<char*> argv, envp;
  for (auto& s : argv_store) argv.push_back(s.data());
  argv.push_back(nullptr);
  for (auto& s : env_store) envp.push_back(s.data());
  envp.push_back(nullptr);
  const std::string out = p.out.string(), err = p.err.string(), dir = cwd.string();

  p.pid = fork();
  if (p.pid == 0) {
    const int o = ::open(out.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    const int e = ::open(err.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (o < 0 || e < 0 || ::dup2(o, 1) < 0 || ::dup2(e, 2) < 0 || ::chdir(dir.c_str()) != 0) _exit(126);
    ::execve(argv[0], argv.data(), envp.data());
    _exit(127);
  }
  if (p.pid < 0) ADD_FAILURE() << "fork failed: " << std::strerror(errno);
  return p;
}

// Waits for every process. The watchdog is a time-out, not a bound: it only ends a run that would
// otherwise hang the test suite, and reports it.
std::vector<ProcessResult> waitAll(std::vector<Process>& procs,
                                   std::chrono::seconds watchdog = std::chrono::seconds(270)) {
  std::vector<ProcessResult> results(procs.size());
  std::vector<bool> done(procs.size(), false);
  size_t left = procs.size();
  const auto deadline = std::chrono::steady_clock::now() + watchdog;
  bool killed = false;
  while (left > 0) {
    for (size_t i = 0; i < procs.size(); ++i) {
      if (done[i] || procs[i].pid <= 0) {
        if (!done[i]) {
          done[i] = true;
          --left;
        }
        continue;
      }
      int status = 0;
      const pid_t r = ::waitpid(procs[i].pid, &status, WNOHANG);
      if (r == procs[i].pid) {
        done[i] = true;
        --left;
        results[i].exit_code = WIFEXITED(status) ? WEXITSTATUS(status)
                                                 : 128 + (WIFSIGNALED(status) ? WTERMSIG(status) : 0);
        results[i].signal = WIFSIGNALED(status) ? WTERMSIG(status) : 0;
      }
    }
    if (left == 0) break;
    if (!killed && std::chrono::steady_clock::now() > deadline) {
      killed = true;
      for (size_t i = 0; i < procs.size(); ++i)
        if (!done[i]) ::kill(procs[i].pid, SIGKILL);
      ADD_FAILURE() << "watchdog: processes still running after " << watchdog.count() << " s were killed";
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  for (size_t i = 0; i < procs.size(); ++i) {
    results[i].out = readText(procs[i].out);
    results[i].err = readText(procs[i].err);
    results[i].command = procs[i].command;
  }
  return results;
}

ProcessResult runCli(const std::vector<std::string>& args, const EnvOverrides& env, const fs::path& cwd) {
  TempDir capture;
  std::vector<Process> procs{spawnCli(args, env, cwd, capture.path(), "cli")};
  return waitAll(procs).front();
}

// Processes of this user whose environment holds MOE_LBCHECK_TEST_TOKEN=token.
std::vector<pid_t> processesWithToken(const std::string& token) {
  std::vector<pid_t> found;
  const std::string needle = "MOE_LBCHECK_TEST_TOKEN=" + token;
  DIR* proc = ::opendir("/proc");
  if (proc == nullptr) return found;
  while (dirent* d = ::readdir(proc)) {
    if (!std::isdigit(static_cast<unsigned char>(d->d_name[0]))) continue;
    const std::string env = readText(fs::path("/proc") / d->d_name / "environ");
    std::string entry;
    std::istringstream in(env);
    while (std::getline(in, entry, '\0')) {
      if (entry == needle) {
        // A zombie left for its parent to reap has no environment any more; a live one has.
        found.push_back(static_cast<pid_t>(std::atoi(d->d_name)));
        break;
      }
    }
  }
  ::closedir(proc);
  return found;
}

// A TCP port that was free a moment ago (for the tests that start the ranks themselves).
int freePort() {
  const int s = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  addr.sin_port = 0;
  socklen_t len = sizeof addr;
  if (s < 0 || ::bind(s, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0 ||
      ::getsockname(s, reinterpret_cast<sockaddr*>(&addr), &len) != 0) {
    ADD_FAILURE() << "cannot find a free port: " << std::strerror(errno);
    if (s >= 0) ::close(s);
    return 0;
  }
  const int port = ntohs(addr.sin_port);
  ::close(s);
  return port;
}

// A scenario file derived from a shipped one with another mesh (and optionally another dtype).
fs::path withMesh(const fs::path& dir, const std::string& scenario, int dp, int pp, int cp, int mb,
                  const std::string& dtype = "") {
  json j = json::parse(readText(fs::path(MOE_SCENARIOS_DIR) / scenario));
  j["mesh"]["dp"] = dp;
  j["mesh"]["pp"] = pp;
  j["mesh"]["cp"] = cp;
  j["mesh"]["microbatches"] = mb;
  if (!dtype.empty()) j["model"]["dtype"] = dtype;
  const std::string stem = fs::path(scenario).stem().string();
  const fs::path out = dir / (stem + "-dp" + std::to_string(dp) + "pp" + std::to_string(pp) + "cp" +
                              std::to_string(cp) + "mb" + std::to_string(mb) + dtype + ".json");
  std::ofstream(out) << j.dump(2);
  return out;
}

struct MeshRunDump {
  int index = 0;
  RunKnobs knobs;
  std::vector<std::vector<double>> router_grad;
};

std::vector<MeshRunDump> readDumps(const fs::path& dir) {
  std::vector<MeshRunDump> dumps;
  for (int i = 0;; ++i) {
    const fs::path file = dir / ("mesh_run_" + std::to_string(i) + ".json");
    if (!fs::exists(file)) break;
    const json j = json::parse(readText(file));
    MeshRunDump d;
    d.index = j.at("index").get<int>();
    d.knobs.main_loss_weight = j.at("knobs").at(0).get<double>();
    d.knobs.aux_coeff = j.at("knobs").at(1).get<double>();
    d.knobs.z_loss_coeff = j.at("knobs").at(2).get<double>();
    d.knobs.detach_router_inputs = j.value("detach_router_inputs", false);
    d.router_grad = j.at("router_grad").get<std::vector<std::vector<double>>>();
    dumps.push_back(std::move(d));
  }
  return dumps;
}

// max |g - e| / max |e|: the relative difference of one layer's gradient.
double relativeDifference(const std::vector<double>& g, const std::vector<double>& e) {
  double num = 0, den = 0;
  for (size_t i = 0; i < std::min(g.size(), e.size()); ++i) {
    num = std::max(num, std::fabs(g[i] - e[i]));
    den = std::max(den, std::fabs(e[i]));
  }
  if (g.size() != e.size()) return INFINITY;
  if (den == 0) return num == 0 ? 0.0 : INFINITY;
  return num / den;
}

// Re-runs every dumped mesh run with the emulated backend; returns the largest relative difference.
double compareWithEmulated(const fs::path& scenario_file, const std::vector<MeshRunDump>& dumps) {
  const Scenario sc = resolveScenario(loadScenarioFile(scenario_file.string()));  // what rank 0 runs
  const ProblemData data = loadProblem(sc);
  double worst = 0;
  for (const MeshRunDump& d : dumps) {
    MeshRequest request;
    request.scenario = &sc;
    request.data = &data;
    request.knobs = d.knobs;
    EmulatedBackend backend;
    const std::vector<std::vector<double>> e = backend.run(request).layerGradients(sc.model.layers);
    EXPECT_EQ(d.router_grad.size(), e.size()) << "mesh run " << d.index;
    for (size_t l = 0; l < std::min(d.router_grad.size(), e.size()); ++l) {
      const double rel = relativeDifference(d.router_grad[l], e[l]);
      EXPECT_LE(rel, kAgreementTolerance) << "mesh run " << d.index << " layer " << l;
      worst = std::max(worst, rel);
    }
  }
  return worst;
}

std::set<std::string> listDir(const fs::path& dir) {
  std::set<std::string> names;
  for (const auto& e : fs::directory_iterator(dir)) names.insert(e.path().filename().string());
  return names;
}

// The gloo run (the tool's own launcher) and the emulated run of one scenario: same exit code,
// verdict and check outcomes, gradients within kAgreementTolerance; rank 0 alone writes the report.
void checkAgreement(const fs::path& scenario_file, const std::string& label) {
  TempDir dir;
  const fs::path dumps = dir / "dumps";
  fs::create_directory(dumps);
  const std::string token = uniqueToken();
  const ProcessResult gloo = runCli(
      {"run", scenario_file.string(), "--backend", "gloo", "--report", (dir / "gloo.json").string()},
      {{"MOE_LBCHECK_TEST_DUMP_MESH_RUNS", dumps.string()}, {"MOE_LBCHECK_TEST_TOKEN", token}},
      dir.path());
  const ProcessResult emulated =
      runCli({"run", scenario_file.string(), "--report", (dir / "emulated.json").string()}, {}, dir.path());
  EXPECT_TRUE(processesWithToken(token).empty()) << "a rank outlived the launcher";
  ASSERT_EQ(gloo.exit_code, emulated.exit_code) << gloo << "\n" << emulated;
  ASSERT_TRUE(fs::exists(dir / "gloo.json")) << gloo;
  EXPECT_EQ(listDir(dir.path()), (std::set<std::string>{"dumps", "gloo.json", "emulated.json"}))
      << "only rank 0 may write, and only what was asked";

  const json g = json::parse(readText(dir / "gloo.json"));
  const json e = json::parse(readText(dir / "emulated.json"));
  EXPECT_EQ(g.at("mesh").at("backend"), "gloo");
  EXPECT_EQ(g.at("verdict"), e.at("verdict"));
  EXPECT_EQ(g.at("expectation_met"), e.at("expectation_met"));
  const json& gc = g.at("checks");
  const json& ec = e.at("checks");
  ASSERT_EQ(gc.size(), ec.size());
  for (size_t i = 0; i < gc.size(); ++i) {
    EXPECT_EQ(gc[i].at("name"), ec[i].at("name"));
    EXPECT_EQ(gc[i].at("ok"), ec[i].at("ok")) << gc[i].at("name");
    if (gc[i].at("scale").is_number() && ec[i].at("scale").is_number()) {
      const double a = gc[i].at("scale").get<double>(), b = ec[i].at("scale").get<double>();
      EXPECT_LE(std::fabs(a - b), 1e-9 * std::max(1.0, std::fabs(b))) << gc[i].at("name");
    }
  }

  const std::vector<MeshRunDump> runs = readDumps(dumps);
  EXPECT_GE(runs.size(), 2u) << "rank 0 dumps every mesh run (aux, [2 x aux,] main)";
  const double worst = compareWithEmulated(scenario_file, runs);
  const Scenario sc = loadScenarioFile(scenario_file.string());
  std::printf("[gloo agreement] %s: %d ranks, %zu mesh runs, max relative difference gloo vs emulated "
              "%.3e\n",
              label.c_str(), static_cast<int>(sc.mesh.world()), runs.size(), worst);
  ::testing::Test::RecordProperty("max_relative_difference", std::to_string(worst));
  EXPECT_LE(worst, kAgreementTolerance);
}

// Every shipped scenario but the fixed twins: a twin has its fault's mesh and preset without the
// fault, which the fault's own scenario and the preset-*.json files already run on gloo; leaving
// the 23 twins out keeps this suite's share of the test time near four minutes on two cores.
std::vector<std::string> shippedScenarios() {
  std::vector<std::string> names;
  for (const auto& e : fs::directory_iterator(MOE_SCENARIOS_DIR)) {
    const std::string stem = e.path().stem().string();
    const bool fixed_twin = stem.size() > 6 && stem.compare(stem.size() - 6, 6, "-fixed") == 0;
    if (e.path().extension() == ".json" && !fixed_twin) names.push_back(e.path().filename().string());
  }
  std::sort(names.begin(), names.end());
  return names;
}

std::string testName(const ::testing::TestParamInfo<std::string>& info) {
  std::string n = fs::path(info.param).stem().string();
  for (char& c : n)
    if (!std::isalnum(static_cast<unsigned char>(c))) c = '_';
  return n;
}

// Sets (or, with nullopt, unsets) environment variables for one scope of this process.
class ScopedEnv {
 public:
  ScopedEnv(std::initializer_list<std::pair<const char*, std::optional<std::string>>> vars) {
    // Start from a clean launcher environment, whatever the CI runs under.
    std::vector<std::string> names;
    for (char** e = environ; *e != nullptr; ++e) {
      const std::string entry(*e);
      const std::string name = entry.substr(0, entry.find('='));
      if (isLauncherVariable(name)) names.push_back(name);
    }
    for (const auto& n : names) save(n), ::unsetenv(n.c_str());
    for (const auto& [name, value] : vars) {
      save(name);
      if (value) ::setenv(name, value->c_str(), 1);
      else ::unsetenv(name);
    }
  }
  ~ScopedEnv() {
    for (const auto& [name, value] : saved_) {
      if (value) ::setenv(name.c_str(), value->c_str(), 1);
      else ::unsetenv(name.c_str());
    }
  }

 private:
  void save(const std::string& name) {
    if (saved_.count(name)) return;
    const char* v = std::getenv(name.c_str());
    saved_[name] = v ? std::optional<std::string>(v) : std::nullopt;
  }
  std::map<std::string, std::optional<std::string>> saved_;
};

template <class F>
std::string usageErrorOf(F&& f) {
  try {
    f();
  } catch (const UsageError& e) {
    return e.what();
  } catch (const std::exception& e) {
    return std::string("unexpected exception: ") + e.what();
  }
  return "no exception";
}

Scenario quickstartWithMesh(int dp, int pp, int cp, int mb) {
  Scenario sc = loadScenarioFile((fs::path(MOE_SCENARIOS_DIR) / "quickstart.json").string());
  sc.mesh.dp = dp;
  sc.mesh.pp = pp;
  sc.mesh.cp = cp;
  sc.mesh.microbatches = mb;
  return sc;
}

// ------------------------------------------------------------------------------------------------
// Agreement with the emulated backend

class GlooScenario : public ::testing::TestWithParam<std::string> {};

TEST_P(GlooScenario, AgreesWithEmulated) {
  checkAgreement(fs::path(MOE_SCENARIOS_DIR) / GetParam(), GetParam());
}

INSTANTIATE_TEST_SUITE_P(Gloo, GlooScenario, ::testing::ValuesIn(shippedScenarios()), testName);

TEST(GlooMesh, TwoRanksPipeline) {
  TempDir dir;
  checkAgreement(withMesh(dir.path(), "quickstart.json", 1, 2, 1, 2), "quickstart dp=1 pp=2 cp=1 mb=2");
}

TEST(GlooMesh, FourRanksDataAndPipeline) {
  TempDir dir;
  checkAgreement(withMesh(dir.path(), "quickstart.json", 2, 2, 1, 2), "quickstart dp=2 pp=2 cp=1 mb=2");
}

TEST(GlooMesh, EightRanksDataPipelineAndContext) {
  TempDir dir;
  checkAgreement(withMesh(dir.path(), "quickstart.json", 2, 2, 2, 2), "quickstart dp=2 pp=2 cp=2 mb=2");
}

TEST(GlooMesh, FourRanksGlobalBatchCountsThroughThePipeline) {
  // aux global_batch: the forward-only counts pre-pass sends activations along the pipeline and
  // all-reduces the counts over dp x cp.
  TempDir dir;
  checkAgreement(withMesh(dir.path(), "batch_wise_counts_per_microbatch-fixed.json", 1, 2, 2, 5),
                 "batch_wise_counts_per_microbatch-fixed dp=1 pp=2 cp=2 mb=5");
}

TEST(GlooMesh, FourRanksFloat32SumsInGroupRankOrder) {
  // Not float64: all-gathered and summed in group-rank order, the emulated arithmetic exactly.
  TempDir dir;
  checkAgreement(withMesh(dir.path(), "quickstart.json", 2, 1, 2, 1, "float32"),
                 "quickstart float32 dp=2 pp=1 cp=2 mb=1");
}

// ------------------------------------------------------------------------------------------------
// Faults of the system: a rank that exits, crashes or hangs

struct FaultRun {
  ProcessResult result;
  std::vector<pid_t> leftovers;
};

FaultRun runWithFault(const std::string& hook, int rank, const std::string& timeout_s = "4") {
  TempDir dir;
  const fs::path scenario = withMesh(dir.path(), "quickstart.json", 2, 2, 1, 2);  // 4 ranks
  const std::string token = uniqueToken();
  FaultRun run;
  run.result = runCli({"run", scenario.string(), "--backend", "gloo", "--report", (dir / "r.json").string()},
                      {{hook, std::to_string(rank)},
                       {"MOE_LBCHECK_TIMEOUT_S", timeout_s},
                       {"MOE_LBCHECK_TEST_TOKEN", token}},
                      dir.path());
  run.leftovers = processesWithToken(token);
  EXPECT_FALSE(fs::exists(dir / "r.json")) << "a failed run writes no report";
  return run;
}

// Every rank but `failed` ended on its own with code 3 and named the operation that failed.
void expectSurvivorsNamedTheirOperation(const ProcessResult& r, int failed, int world) {
  for (int k = 0; k < world; ++k) {
    if (k == failed) continue;
    EXPECT_TRUE(contains(r.err, "rank " + std::to_string(k) + ": exited with code 3")) << r;
    const std::string prefix = "moe-lbcheck: error: gloo rank " + std::to_string(k) + " ";
    const auto at = r.err.find(prefix);
    ASSERT_NE(at, std::string::npos) << "rank " << k << " printed no error naming itself\n" << r;
    const std::string line = r.err.substr(at, r.err.find('\n', at) - at);
    const bool names_op = contains(line, "allReduceSum(") || contains(line, "recv(from ") ||
                          contains(line, "send(to ") || contains(line, "barrier(") ||
                          contains(line, "waiting for rank 0");
    EXPECT_TRUE(names_op) << line;
  }
}

// A rank fault injected at the first mesh run of a 4-rank mesh, and how the launcher must name it.
struct RankFault {
  const char* name;
  const char* hook;   // the MOE_LBCHECK_TEST_* variable (src/sim/test_hooks.hpp)
  int rank;
  const char* cause;  // in the launcher's summary
  const char* also;   // some rank's message also says this ("" = nothing more)
};

class GlooFaults : public ::testing::TestWithParam<RankFault> {};

// Every surviving rank ends on its own with code 3 naming its operation, the launcher names the
// faulty rank and how it ended, and no process is left behind.
TEST_P(GlooFaults, EveryOtherRankExits3AndTheLauncherNamesTheRank) {
  const RankFault& f = GetParam();
  const FaultRun run = runWithFault(f.hook, f.rank);
  const ProcessResult& r = run.result;
  EXPECT_EQ(r.exit_code, 3) << r;
  EXPECT_TRUE(contains(r.err, f.cause)) << r;
  if (*f.also != '\0') EXPECT_TRUE(contains(r.err, f.also)) << r;
  expectSurvivorsNamedTheirOperation(r, f.rank, 4);
  EXPECT_TRUE(run.leftovers.empty()) << "processes left behind";
}

INSTANTIATE_TEST_SUITE_P(
    Ranks, GlooFaults,
    ::testing::Values(
        RankFault{"RankExits", "MOE_LBCHECK_TEST_EXIT_RANK", 2, "rank 2 failed first (exited with code 9", ""},
        RankFault{"RankZeroExits", "MOE_LBCHECK_TEST_EXIT_RANK", 0, "rank 0 failed first (exited with code 9", ""},
        RankFault{"RankAborts", "MOE_LBCHECK_TEST_CRASH_RANK", 1, "rank 1 failed first (killed by signal 6", ""},
        RankFault{"RankSegfaults", "MOE_LBCHECK_TEST_SEGV_RANK", 1, "rank 1 failed first (killed by signal 11", ""},
        RankFault{"RankIsKilled", "MOE_LBCHECK_TEST_KILL_RANK", 2, "rank 2 failed first (killed by signal 9", ""},
        // The others time out in their collective with it; the launcher kills it after the grace.
        RankFault{"RankHangsInACollective", "MOE_LBCHECK_TEST_HANG_RANK", 3, "rank 3: killed by the launcher",
                  "imed out"}),
    [](const auto& info) { return std::string(info.param.name); });

// Rank 0 alive but stuck outside any collective (where it computes the reference): its heartbeat
// carries progress, not liveness, so the waiting ranks give up after the timeout.
TEST(GlooRankZero, StuckOutsideACollectiveIsDetected) {
  const FaultRun run = runWithFault("MOE_LBCHECK_TEST_STALL_RANK0", 1);
  const ProcessResult& r = run.result;
  EXPECT_EQ(r.exit_code, 3) << r;
  for (int k = 1; k < 4; ++k) {
    EXPECT_TRUE(contains(r.err, "rank " + std::to_string(k) + ": exited with code 3")) << r;
    EXPECT_TRUE(contains(r.err, "gloo rank " + std::to_string(k) + " waiting for rank 0's first mesh run")) << r;
  }
  EXPECT_TRUE(contains(r.err, "rank 0 has made no progress for")) << r;
  EXPECT_TRUE(contains(r.err, "rank 0: killed by the launcher")) << r;
  EXPECT_TRUE(run.leftovers.empty()) << "processes left behind";
}

// A legitimate phase of rank 0 longer than the timeout (the reference takes minutes at DeepSeek-V3
// size) is not a hang: it advances rank 0's progress counter, and the run passes.
TEST(GlooRankZero, LongPhaseThatProgressesIsNotAHang) {
  TempDir dir;
  const fs::path scenario = withMesh(dir.path(), "quickstart.json", 2, 1, 1, 1);  // 2 ranks
  const ProcessResult r =
      runCli({"run", scenario.string(), "--backend", "gloo", "--report", (dir / "r.json").string()},
             {{"MOE_LBCHECK_TEST_SLOW_RANK0_S", "7"}, {"MOE_LBCHECK_TIMEOUT_S", "2"}}, dir.path());
  EXPECT_EQ(r.exit_code, 0) << r;
  EXPECT_TRUE(contains(r.err, "test hook: rank 0 works 7 s more")) << r;
  EXPECT_TRUE(fs::exists(dir / "r.json")) << r;
}

// ------------------------------------------------------------------------------------------------
// Interrupts: SIGINT and SIGTERM to the tool end it with 130 and 143, every rank stopped, nothing written

// Starts the tool, sends it `sig` once `ready` appears on its stderr, and waits for it.
ProcessResult interruptOnceReady(const std::vector<std::string>& args, const EnvOverrides& env, const fs::path& cwd,
                                 const std::string& ready, int sig) {
  TempDir capture;
  std::vector<Process> procs{spawnCli(args, env, cwd, capture.path(), "cli")};
  // A safety net for the suite, not a bound on the tool: a run that never gets ready is reported.
  const auto give_up = std::chrono::steady_clock::now() + std::chrono::seconds(120);
  bool sent = false;
  while (std::chrono::steady_clock::now() < give_up) {
    if (contains(readText(procs[0].err), ready)) {
      ::kill(procs[0].pid, sig);
      sent = true;
      break;
    }
    int status = 0;
    if (::waitpid(procs[0].pid, &status, WNOHANG) == procs[0].pid) {
      ADD_FAILURE() << "the tool ended before it printed '" << ready << "'";
      procs[0].pid = -1;
      break;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  if (!sent && procs[0].pid > 0) ADD_FAILURE() << "'" << ready << "' never appeared";
  return waitAll(procs).front();
}

void expectInterrupted(int sig, int code, const std::vector<std::string>& extra_outputs) {
  TempDir dir;
  const fs::path scenario = withMesh(dir.path(), "quickstart.json", 2, 2, 1, 2);  // 4 ranks
  const std::string token = uniqueToken();
  std::vector<std::string> args{"run", scenario.string(), "--backend", "gloo", "--report", "r.json", "--junit", "j.xml"};
  args.insert(args.end(), extra_outputs.begin(), extra_outputs.end());
  const ProcessResult r =
      interruptOnceReady(args, {{"MOE_LBCHECK_TEST_SLOW_RANK0_S", "600"}, {"MOE_LBCHECK_TEST_TOKEN", token}},
                         dir.path(), "test hook: rank 0 works", sig);
  EXPECT_EQ(r.signal, 0) << "the tool exits with a code, it is not killed\n" << r;
  EXPECT_EQ(r.exit_code, code) << r;
  EXPECT_TRUE(contains(r.err, "interrupted by signal " + std::to_string(sig))) << r;
  EXPECT_EQ(listDir(dir.path()), std::set<std::string>{scenario.filename().string()}) << "nothing written\n" << r;
  EXPECT_TRUE(processesWithToken(token).empty()) << "processes left behind";
}

TEST(Interrupts, SigintStopsAGlooRunWith130) { expectInterrupted(SIGINT, 130, {}); }

TEST(Interrupts, SigtermStopsAGlooRunWith143AndWritesNoCapture) {
  expectInterrupted(SIGTERM, 143, {"--capture", "cap", "--dump", "d.safetensors"});
}

TEST(Interrupts, SigtermStopsAnEmulatedSweepWith143) {
  TempDir dir;
  const ProcessResult r = interruptOnceReady(
      {"sweep", (fs::path(MOE_SCENARIOS_DIR) / "quickstart.json").string(), "--world", "8", "--report", "s.json",
       "--junit", "s.xml"},
      {}, dir.path(), "[2/", SIGTERM);
  EXPECT_EQ(r.signal, 0) << r;
  EXPECT_EQ(r.exit_code, 143) << r;
  EXPECT_TRUE(contains(r.err, "interrupted by signal 15")) << r;
  EXPECT_TRUE(listDir(dir.path()).empty()) << "nothing written\n" << r;
}

// ------------------------------------------------------------------------------------------------
// The local launcher keeps everything on loopback: a FileStore in a private folder, Gloo on 127.0.0.1

struct TcpSocket {
  std::string local;  // hex address:port as /proc/net/tcp{,6} writes it
  std::string remote;
  bool listening = false;
  bool loopback = false;  // the local address is 127.0.0.0/8 or ::1
};

// The TCP sockets of process `pid`: its socket inodes (/proc/PID/fd) looked up in /proc/net/tcp{,6}.
std::vector<TcpSocket> tcpSocketsOf(pid_t pid) {
  std::set<std::string> inodes;
  std::error_code ec;
  for (const auto& e : fs::directory_iterator("/proc/" + std::to_string(pid) + "/fd", ec)) {
    const std::string target = fs::read_symlink(e.path(), ec).string();
    if (target.rfind("socket:[", 0) == 0) inodes.insert(target.substr(8, target.size() - 9));
  }
  std::vector<TcpSocket> found;
  for (const char* table : {"/proc/net/tcp", "/proc/net/tcp6"}) {
    std::istringstream lines(readText(table));
    std::string line;
    std::getline(lines, line);  // the header
    while (std::getline(lines, line)) {
      std::istringstream f(line);
      std::string slot, local, remote, state, queues, timer, retransmits, uid, timeout, inode;
      f >> slot >> local >> remote >> state >> queues >> timer >> retransmits >> uid >> timeout >> inode;
      if (inodes.count(inode) == 0) continue;
      const std::string address = local.substr(0, local.find(':'));
      TcpSocket sock;
      sock.local = local;
      sock.remote = remote;
      sock.listening = state == "0A";
      sock.loopback = (address.size() == 8 && address.compare(6, 2, "7F") == 0) ||     // 127.x.x.x
                      address == "00000000000000000000000001000000" ||                 // ::1
                      (address.size() == 32 && address.compare(0, 24, "0000000000000000FFFF0000") == 0 &&
                       address.compare(30, 2, "7F") == 0);                             // ::ffff:127.x.x.x
      found.push_back(sock);
    }
  }
  return found;
}

TEST(Loopback, LocalGlooRunListensOnlyOnLoopback) {
  TempDir dir, capture;
  const fs::path scenario = withMesh(dir.path(), "quickstart.json", 2, 2, 1, 2);  // 4 ranks
  const std::string token = uniqueToken();
  std::vector<Process> procs{spawnCli({"run", scenario.string(), "--backend", "gloo"},
                                      {{"MOE_LBCHECK_TEST_SLOW_RANK0_S", "4"}, {"MOE_LBCHECK_TEST_TOKEN", token}},
                                      dir.path(), capture.path(), "cli")};
  // While rank 0 is in its long phase every rank has rendezvoused and created its Gloo groups.
  const auto give_up = std::chrono::steady_clock::now() + std::chrono::seconds(120);
  while (!contains(readText(procs[0].err), "test hook: rank 0 works") && std::chrono::steady_clock::now() < give_up)
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  const std::vector<pid_t> pids = processesWithToken(token);
  int listening = 0, connected = 0;
  for (pid_t pid : pids)
    for (const TcpSocket& sock : tcpSocketsOf(pid)) {
      EXPECT_TRUE(sock.loopback) << "process " << pid << " has a TCP socket on " << sock.local
                                 << (sock.listening ? " (listening)" : "");
      listening += sock.listening;
      connected += !sock.listening;
    }
  const ProcessResult r = waitAll(procs).front();
  EXPECT_EQ(r.exit_code, 0) << r;
  EXPECT_EQ(pids.size(), 5u) << "the launcher and its 4 ranks";
  EXPECT_GT(connected, 0) << "Gloo's pairs are TCP connections: the check saw them";
  std::printf("[loopback] %zu processes: %d listening and %d connected TCP sockets, all on loopback\n", pids.size(),
              listening, connected);
}

// ------------------------------------------------------------------------------------------------
// Launcher environments: the ranks started by someone else

enum class Style { kTorchrun, kSrun, kMpirun };

EnvOverrides rankEnv(Style style, int rank, int world, int port) {
  EnvOverrides env{{"MASTER_ADDR", "127.0.0.1"}, {"MASTER_PORT", std::to_string(port)}};
  switch (style) {
    case Style::kTorchrun:
      env["RANK"] = std::to_string(rank);
      env["WORLD_SIZE"] = std::to_string(world);
      env["LOCAL_RANK"] = std::to_string(rank);
      env["LOCAL_WORLD_SIZE"] = std::to_string(world);
      break;
    case Style::kSrun:
      env["SLURM_PROCID"] = std::to_string(rank);
      env["SLURM_NTASKS"] = std::to_string(world);
      env["SLURM_LOCALID"] = std::to_string(rank);
      env["SLURM_STEP_ID"] = "0";
      break;
    case Style::kMpirun:
      env["OMPI_COMM_WORLD_RANK"] = std::to_string(rank);
      env["OMPI_COMM_WORLD_SIZE"] = std::to_string(world);
      env["OMPI_COMM_WORLD_LOCAL_RANK"] = std::to_string(rank);
      break;
  }
  return env;
}

void runUnderLauncher(Style style) {
  TempDir dir, work, capture;
  const fs::path scenario = withMesh(dir.path(), "quickstart.json", 1, 2, 1, 2);  // 2 ranks
  const fs::path dumps = dir / "dumps";
  fs::create_directory(dumps);
  const int port = freePort();
  std::vector<Process> procs;
  for (int r = 0; r < 2; ++r) {
    EnvOverrides env = rankEnv(style, r, 2, port);
    env["MOE_LBCHECK_TEST_DUMP_MESH_RUNS"] = dumps.string();
    procs.push_back(spawnCli({"run", scenario.string(), "--backend", "gloo", "--report", "report.json"}, env,
                             work.path(), capture.path(), "rank" + std::to_string(r)));
  }
  const std::vector<ProcessResult> results = waitAll(procs);
  EXPECT_EQ(results[0].exit_code, 0) << results[0];
  EXPECT_EQ(results[1].exit_code, 0) << results[1];
  EXPECT_FALSE(results[0].out.empty()) << "rank 0 prints the report";
  EXPECT_TRUE(results[1].out.empty()) << "other ranks print nothing\n" << results[1];
  EXPECT_TRUE(results[1].err.empty()) << results[1];
  EXPECT_EQ(listDir(work.path()), std::set<std::string>{"report.json"}) << "only rank 0 writes";
  const json report = json::parse(readText(work / "report.json"));
  EXPECT_EQ(report.at("mesh").at("backend"), "gloo");
  EXPECT_EQ(report.at("verdict"), "pass");
  const double worst = compareWithEmulated(scenario, readDumps(dumps));
  EXPECT_LE(worst, kAgreementTolerance);
}

TEST(GlooLauncherEnv, TorchrunVariables) { runUnderLauncher(Style::kTorchrun); }
TEST(GlooLauncherEnv, SrunVariables) { runUnderLauncher(Style::kSrun); }
TEST(GlooLauncherEnv, MpirunVariables) { runUnderLauncher(Style::kMpirun); }

// Under the current environment, detectRankEnvironment(0) finds these coordinates, set by `launcher`.
void expectDetected(int rank, int world_size, int local_rank, const std::string& launcher) {
  const auto e = detectRankEnvironment(0);
  ASSERT_TRUE(e.has_value()) << launcher;
  EXPECT_EQ(e->rank, rank) << launcher;
  EXPECT_EQ(e->world_size, world_size) << launcher;
  EXPECT_EQ(e->local_rank, local_rank) << launcher;
  EXPECT_TRUE(contains(e->source, launcher)) << e->source;
}

TEST(GlooLauncherEnv, DetectsEachLauncherInOrderOfPrecedence) {
  {
    ScopedEnv env({{"RANK", std::nullopt}});
    EXPECT_FALSE(detectRankEnvironment(0).has_value()) << "no variables: launch the ranks";
  }
  {
    ScopedEnv env({{"RANK", "1"}, {"WORLD_SIZE", "4"}, {"LOCAL_RANK", "1"}, {"MASTER_ADDR", "node7"},
                   {"MASTER_PORT", "29501"}, {"OMPI_COMM_WORLD_RANK", "3"}, {"OMPI_COMM_WORLD_SIZE", "8"}});
    expectDetected(1, 4, 1, "torchrun");
    const auto e = detectRankEnvironment(0);
    ASSERT_TRUE(e.has_value());
    EXPECT_EQ(e->master_addr, "node7");
    EXPECT_EQ(e->master_port, 29501);
    EXPECT_FALSE(e->launcher_hosts_store);
  }
  {
    ScopedEnv env({{"OMPI_COMM_WORLD_RANK", "2"}, {"OMPI_COMM_WORLD_SIZE", "3"},
                   {"OMPI_COMM_WORLD_LOCAL_RANK", "0"}, {"MASTER_ADDR", "127.0.0.1"},
                   {"MASTER_PORT", "29500"}});
    expectDetected(2, 3, 0, "mpirun");
    EXPECT_FALSE(detectRankEnvironment(3).has_value()) << "--nproc: this process is the launcher";
  }
  {
    ScopedEnv env({{"SLURM_PROCID", "5"}, {"SLURM_NTASKS", "8"}, {"SLURM_LOCALID", "1"},
                   {"SLURM_STEP_ID", "0"}, {"MASTER_ADDR", "127.0.0.1"}, {"MASTER_PORT", "29500"}});
    expectDetected(5, 8, 1, "srun");
  }
  {
    // A batch script's own environment (no job step) is not a step of N ranks.
    ScopedEnv env({{"SLURM_PROCID", "0"}, {"SLURM_NTASKS", "8"}});
    EXPECT_FALSE(detectRankEnvironment(0).has_value());
  }
}

TEST(GlooLauncherEnv, IncompleteOrMalformedVariablesAreUsageErrors) {
  {
    ScopedEnv env({{"RANK", "0"}, {"MASTER_ADDR", "127.0.0.1"}, {"MASTER_PORT", "29500"}});
    EXPECT_TRUE(contains(usageErrorOf([] { detectRankEnvironment(0); }), "WORLD_SIZE is not"));
  }
  {
    ScopedEnv env({{"RANK", "4"}, {"WORLD_SIZE", "4"}, {"MASTER_ADDR", "127.0.0.1"}, {"MASTER_PORT", "29500"}});
    EXPECT_TRUE(contains(usageErrorOf([] { detectRankEnvironment(0); }), "RANK='4'"));
  }
  {
    ScopedEnv env({{"RANK", "0"}, {"WORLD_SIZE", "2"}, {"MASTER_PORT", "29500"}});
    EXPECT_TRUE(contains(usageErrorOf([] { detectRankEnvironment(0); }), "MASTER_ADDR is not set"));
  }
  {
    ScopedEnv env({{"RANK", "0"}, {"WORLD_SIZE", "2"}, {"MASTER_ADDR", "127.0.0.1"}});
    EXPECT_TRUE(contains(usageErrorOf([] { detectRankEnvironment(0); }), "MASTER_PORT is not set"));
  }
  {
    ScopedEnv env({{"RANK", "0"}, {"WORLD_SIZE", "2"}, {"MASTER_ADDR", "127.0.0.1"}, {"MASTER_PORT", "70000"}});
    EXPECT_TRUE(contains(usageErrorOf([] { detectRankEnvironment(0); }), "MASTER_PORT='70000'"));
  }
  {
    ScopedEnv env({{"RANK", "0"}, {"WORLD_SIZE", "3"}, {"MASTER_ADDR", "127.0.0.1"}, {"MASTER_PORT", "29500"}});
    const auto e = detectRankEnvironment(0);
    ASSERT_TRUE(e.has_value());
    const std::string msg = usageErrorOf([&] { checkRankEnvironment(*e, quickstartWithMesh(2, 2, 1, 2), 0); });
    EXPECT_TRUE(contains(msg, "WORLD_SIZE=3")) << msg;
    EXPECT_TRUE(contains(msg, "needs 4 ranks")) << msg;
  }
  {
    ScopedEnv env({{"MOE_LBCHECK_TIMEOUT_S", "soon"}});
    EXPECT_TRUE(contains(usageErrorOf([] { distributedTimeout(); }), "MOE_LBCHECK_TIMEOUT_S"));
  }
}

// The same errors from the binary: exit code 2 and a message naming the variable.
TEST(GlooLauncherEnv, WrongWorldSizeExits2) {
  TempDir dir;
  const fs::path scenario = withMesh(dir.path(), "quickstart.json", 1, 2, 1, 2);
  const ProcessResult r = runCli({"run", scenario.string(), "--backend", "gloo"},
                                 {{"RANK", "0"}, {"WORLD_SIZE", "3"}, {"MASTER_ADDR", "127.0.0.1"},
                                  {"MASTER_PORT", std::to_string(freePort())}},
                                 dir.path());
  EXPECT_EQ(r.exit_code, 2) << r;
  EXPECT_TRUE(contains(r.err, "WORLD_SIZE=3")) << r;
  EXPECT_TRUE(contains(r.err, "needs 2 ranks")) << r;
}

TEST(GlooLauncherEnv, MissingMasterAddrExits2) {
  TempDir dir;
  const ProcessResult r =
      runCli({"run", (fs::path(MOE_SCENARIOS_DIR) / "quickstart.json").string(), "--backend", "gloo"},
             {{"RANK", "0"}, {"WORLD_SIZE", "1"}, {"MASTER_PORT", std::to_string(freePort())}}, dir.path());
  EXPECT_EQ(r.exit_code, 2) << r;
  EXPECT_TRUE(contains(r.err, "MASTER_ADDR is not set")) << r;
}

TEST(GlooLauncherEnv, PortInUseExits2) {
  // Hold a listening socket on the port for the whole run.
  const int s = ::socket(AF_INET, SOCK_STREAM, 0);
  ASSERT_GE(s, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_ANY);
  addr.sin_port = 0;
  socklen_t len = sizeof addr;
  ASSERT_EQ(::bind(s, reinterpret_cast<sockaddr*>(&addr), sizeof addr), 0) << std::strerror(errno);
  ASSERT_EQ(::listen(s, 4), 0);
  ASSERT_EQ(::getsockname(s, reinterpret_cast<sockaddr*>(&addr), &len), 0);
  const int port = ntohs(addr.sin_port);
  TempDir dir;
  const ProcessResult r =
      runCli({"run", (fs::path(MOE_SCENARIOS_DIR) / "quickstart.json").string(), "--backend", "gloo"},
             {{"RANK", "0"}, {"WORLD_SIZE", "1"}, {"MASTER_ADDR", "127.0.0.1"},
              {"MASTER_PORT", std::to_string(port)}, {"MOE_LBCHECK_TIMEOUT_S", "5"}},
             dir.path());
  ::close(s);
  EXPECT_EQ(r.exit_code, 2) << r;
  EXPECT_TRUE(contains(r.err, "MASTER_PORT=" + std::to_string(port))) << r;
  EXPECT_TRUE(contains(r.err, "in use")) << r;
}

TEST(GlooLauncherEnv, NprocThatDisagreesWithTheMeshExits2) {
  TempDir dir;
  const ProcessResult r = runCli(
      {"run", (fs::path(MOE_SCENARIOS_DIR) / "quickstart.json").string(), "--backend", "gloo", "--nproc", "3"},
      {}, dir.path());
  EXPECT_EQ(r.exit_code, 2) << r;
  EXPECT_TRUE(contains(r.err, "--nproc 3")) << r;
}

TEST(GlooLauncherEnv, ToolInfoListsGloo) {
  EXPECT_TRUE(glooAvailable());
  TempDir dir;
  const ProcessResult r = runCli({"run", (fs::path(MOE_SCENARIOS_DIR) / "quickstart.json").string(),
                                  "--backend", "gloo", "--report", (dir / "r.json").string()},
                                 {}, dir.path());
  ASSERT_EQ(r.exit_code, 0) << r;
  const json report = json::parse(readText(dir / "r.json"));
  const std::string tool = report.at("tool").dump();
  EXPECT_TRUE(contains(tool, "\"gloo\"")) << tool;
}

}  // namespace
}  // namespace moe::test

// ------------------------------------------------------------------------------------------------
// The tool under the real torchrun (Debian's, torch 1.13): its flags as the README shows them, its
// agent's store (TORCHELASTIC_USE_AGENT_STORE=True: rank 0 connects as a client), one exit code.

namespace moe::test {
namespace {

TEST(GlooLauncher, RealTorchrunLaunchesTheTool) {
  if (!fs::exists("/usr/bin/torchrun")) GTEST_FAIL() << "/usr/bin/torchrun is missing: scripts/setup.sh installs python3-torch";
  TempDir dir;
  const std::string command = "cd " + dir.path().string() +
                              " && env -u RANK -u WORLD_SIZE -u MASTER_ADDR -u MASTER_PORT MOE_LBCHECK_TIMEOUT_S=60 "
                              "/usr/bin/torchrun --nproc_per_node 2 --redirects 1 --tee 1 --no_python " +
                              std::string(MOE_CLI_PATH) + " run " + (fs::path(MOE_SCENARIOS_DIR) / "quickstart.json").string() +
                              " --backend gloo --mesh dp=2 --report R.json 2>&1";
  const test::ShellRun r = test::runShell(command);
  EXPECT_EQ(r.exit_code, 0) << r.output;
  EXPECT_TRUE(contains(r.output, "# moe-lbcheck: OK")) << r.output;
  ASSERT_TRUE(fs::exists(dir / "R.json")) << r.output;
  const json report = json::parse(readText(dir / "R.json"));
  EXPECT_EQ(report["mesh"]["backend"], "gloo");
  EXPECT_EQ(report["mesh"]["world"], 2);
  EXPECT_EQ(report["verdict"], "pass");
}

// A 16-rank mesh over every axis: tp 2, cp 2, dp 2, pp 2 (Megatron, sequence parallel).
TEST(GlooMesh, SixteenRanksTensorContextDataPipeline) {
  TempDir dir;
  const fs::path file = dir / "tp2cp2dp2pp2.json";
  std::ofstream(file) << R"({"schema_version": 1, "name": "tp2cp2dp2pp2", "seed": 3,
    "model": {"hidden": 12, "experts": 8, "top_k": 2, "layers": 4, "ffn": 8},
    "data": {"batch": 4, "seq_len": 8, "valid_lengths": [8, 5, 7, 3]},
    "aux": {"coeff": 0.01, "z_loss_coeff": 0.001},
    "mesh": {"tp": 2, "cp": 2, "dp": 2, "pp": 2, "microbatches": 2},
    "framework": {"preset": "megatron"}})";
  checkAgreement(file, "tp2cp2dp2pp2 megatron");
}

}  // namespace
}  // namespace moe::test
