#include "sim/launcher.hpp"

#include <fcntl.h>
#include <sys/stat.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <iterator>
#include <thread>
#include <vector>

#include <fmt/format.h>

#include "common/errors.hpp"
#include "common/interrupt.hpp"
#include "sim/c10d_communicator.hpp"

extern char** environ;

namespace moe {
namespace {

std::optional<std::string> getEnv(const char* name) {
  const char* v = std::getenv(name);
  if (v == nullptr) return std::nullopt;
  return std::string(v);
}

int parseInt(const std::string& name, const std::string& value, long min, long max,
             const std::string& expected) {
  char* end = nullptr;
  errno = 0;
  const long v = std::strtol(value.c_str(), &end, 10);
  if (value.empty() || errno != 0 || *end != '\0' || v < min || v > max)
    throw UsageError(fmt::format("{}='{}' is not valid: expected {}", name, value, expected));
  return static_cast<int>(v);
}

int meshWorld(const Scenario& sc) { return static_cast<int>(sc.mesh.world()); }

std::string meshText(const Scenario& sc) {
  if (sc.mesh.tp > 1)
    return fmt::format("tp={} x cp={} x dp={} x pp={}", sc.mesh.tp, sc.mesh.cp, sc.mesh.dp, sc.mesh.pp);
  return fmt::format("dp={} x pp={} x cp={}", sc.mesh.dp, sc.mesh.pp, sc.mesh.cp);
}

// Reads rank and world from the named variables (both required once either is set).
void readRankAndWorld(RankEnvironment& env, const char* rank_var, const char* world_var,
                      const char* local_var) {
  const auto rank = getEnv(rank_var), world = getEnv(world_var);
  if (!rank || !world)
    throw UsageError(fmt::format(
        "{} is set but {} is not ({} sets both): set {} to this process's rank in 0..N-1 and {} to "
        "the number of ranks N, or unset them and let `moe-lbcheck run --backend gloo --nproc N` start "
        "the ranks",
        rank ? rank_var : world_var, rank ? world_var : rank_var, env.source, rank_var, world_var));
  env.world_size = parseInt(world_var, *world, 1, 1 << 20, "a positive number of ranks");
  env.rank = parseInt(rank_var, *rank, 0, env.world_size - 1,
                      fmt::format("a rank in 0..{} ({}={})", env.world_size - 1, world_var, *world));
  env.world_variable = world_var;
  env.local_rank = env.rank;
  if (const auto local = getEnv(local_var); local && !local->empty())
    env.local_rank = parseInt(local_var, *local, 0, 1 << 20, "a non-negative local rank");
}

// --- the local launcher ---------------------------------------------------------------------------

volatile sig_atomic_t g_stop_signal = 0;
extern "C" void onStopSignal(int sig) { g_stop_signal = sig; }

// A directory only this user can enter (mkdtemp, 0700), removed with its contents at destruction.
class PrivateDirectory {
 public:
  explicit PrivateDirectory(const std::string& backend) {
    const char* tmp = std::getenv("TMPDIR");
    std::string pattern = std::string(tmp != nullptr && *tmp ? tmp : "/tmp") + "/moe-lbcheck-store-XXXXXX";
    std::vector<char> buf(pattern.begin(), pattern.end());
    buf.push_back('\0');
    if (::mkdtemp(buf.data()) == nullptr)
      throw RuntimeFailure(backend, -1, "launcher: creating the private store directory " + pattern,
                           std::strerror(errno));
    path_ = buf.data();
    ::chmod(path_.c_str(), 0700);
  }
  ~PrivateDirectory() {
    std::error_code ec;
    std::filesystem::remove_all(path_, ec);
  }
  PrivateDirectory(const PrivateDirectory&) = delete;
  PrivateDirectory& operator=(const PrivateDirectory&) = delete;
  const std::string& path() const { return path_; }

 private:
  std::string path_;
};

struct Child {
  pid_t pid = -1;
  bool running = true;
  int status = 0;
  bool killed_by_launcher = false;
  double ended_s = 0;
};

std::string describe(const Child& c) {
  if (c.killed_by_launcher)
    return "killed by the launcher (SIGKILL): still running when the grace period after the first "
           "failure ended, so it hung or was stuck";
  if (WIFEXITED(c.status)) return fmt::format("exited with code {}", WEXITSTATUS(c.status));
  if (WIFSIGNALED(c.status))
    return fmt::format("killed by signal {} ({})", WTERMSIG(c.status), strsignal(WTERMSIG(c.status)));
  return "ended";
}

bool failedExit(const Child& c) { return !WIFEXITED(c.status) || WEXITSTATUS(c.status) != 0; }

std::chrono::milliseconds killGrace(std::chrono::milliseconds timeout) {
  if (const auto v = getEnv("MOE_LBCHECK_KILL_GRACE_S"); v && !v->empty()) {
    char* end = nullptr;
    const double s = std::strtod(v->c_str(), &end);
    if (*end != '\0' || !std::isfinite(s) || s < 0)
      throw UsageError(fmt::format("MOE_LBCHECK_KILL_GRACE_S='{}' is not valid: expected seconds >= 0", *v));
    return std::chrono::milliseconds(static_cast<long long>(s * 1000));
  }
  return timeout + std::chrono::seconds(5);
}

}  // namespace

std::optional<RankEnvironment> detectRankEnvironment(int nproc_flag) {
  RankEnvironment env;
  if (getEnv("RANK") || getEnv("WORLD_SIZE")) {
    env.source = "torchrun (RANK/WORLD_SIZE)";
    readRankAndWorld(env, "RANK", "WORLD_SIZE", "LOCAL_RANK");
  } else if (nproc_flag > 0) {
    return std::nullopt;
  } else if (getEnv("OMPI_COMM_WORLD_RANK") || getEnv("OMPI_COMM_WORLD_SIZE")) {
    env.source = "mpirun (OMPI_COMM_WORLD_RANK/OMPI_COMM_WORLD_SIZE)";
    readRankAndWorld(env, "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK");
  } else if (getEnv("SLURM_PROCID") && getEnv("SLURM_NTASKS") &&
             (getEnv("SLURM_STEP_ID") || getEnv("SLURM_STEPID"))) {
    env.source = "srun (SLURM_PROCID/SLURM_NTASKS)";
    readRankAndWorld(env, "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID");
  } else {
    return std::nullopt;
  }
  const auto addr = getEnv("MASTER_ADDR");
  if (!addr || addr->empty())
    throw UsageError(fmt::format(
        "MASTER_ADDR is not set: {} makes this process rank {} of {}, and every rank needs MASTER_ADDR "
        "(the host of rank 0) and MASTER_PORT (a free TCP port there) to meet; export both (torchrun "
        "sets them), or run without a launcher and let `moe-lbcheck run --backend gloo --nproc N` "
        "start the ranks",
        env.source, env.rank, env.world_size));
  env.master_addr = *addr;
  const auto port = getEnv("MASTER_PORT");
  if (!port || port->empty())
    throw UsageError(fmt::format(
        "MASTER_PORT is not set: {} makes this process rank {} of {}, and every rank needs MASTER_PORT "
        "(a free TCP port on MASTER_ADDR={}) for the rendezvous; export it (torchrun sets it)",
        env.source, env.rank, env.world_size, env.master_addr));
  env.master_port = parseInt("MASTER_PORT", *port, 1, 65535, "a TCP port in 1..65535");
  // torchrun's agent serves the store itself with its static rendezvous (the default) and tells its
  // workers so by TORCHELASTIC_USE_AGENT_STORE=True: rank 0 then connects as a client.
  env.launcher_hosts_store = getEnv("TORCHELASTIC_USE_AGENT_STORE") == std::optional<std::string>("True");
  return env;
}

void checkRankEnvironment(const RankEnvironment& env, const Scenario& scenario, int nproc_flag) {
  const int world = meshWorld(scenario);
  if (env.world_size != world)
    throw UsageError(fmt::format(
        "{}={} (from {}) but the mesh {} needs {} ranks: start {} processes or change the mesh "
        "(--mesh)",
        env.world_variable, env.world_size, env.source, meshText(scenario), world, world));
  if (nproc_flag != 0 && nproc_flag != env.world_size)
    throw UsageError(fmt::format("--nproc {} disagrees with {}={} (from {})", nproc_flag,
                                 env.world_variable, env.world_size, env.source));
}

int launchLocalRanks(const Scenario& scenario, int nproc, const std::string& backend,
                     const std::function<int(const RankEnvironment&)>& run_rank) {
  const int world = meshWorld(scenario);
  if (nproc != world)
    throw UsageError(fmt::format("--nproc {} does not match the mesh: {} needs {} ranks (use --nproc {} "
                                 "or change --mesh)",
                                 nproc, meshText(scenario), world, world));
  if (!glooAvailable())
    throw UsageError("backend '" + backend + "' needs c10d Gloo, which this build does not have; use --backend emulated");
  const std::chrono::milliseconds timeout = distributedTimeout();
  const std::chrono::milliseconds grace = killGrace(timeout);

  // The rendezvous store is a c10d FileStore in a private (0700) directory: nothing listens on a
  // network interface, and no store thread exists in this process when it forks.
  const PrivateDirectory store_dir(backend);
  const std::string store_path = store_dir.path() + "/store";

  struct sigaction action {}, old_int {}, old_term {}, old_hup {};
  action.sa_handler = onStopSignal;
  sigemptyset(&action.sa_mask);
  g_stop_signal = 0;
  sigaction(SIGINT, &action, &old_int);
  sigaction(SIGTERM, &action, &old_term);
  sigaction(SIGHUP, &action, &old_hup);
  auto restoreSignals = [&] {
    sigaction(SIGINT, &old_int, nullptr);
    sigaction(SIGTERM, &old_term, nullptr);
    sigaction(SIGHUP, &old_hup, nullptr);
  };

  std::cout.flush();
  std::cerr.flush();
  std::fflush(nullptr);
  const pid_t launcher_pid = getpid();
  const auto t0 = std::chrono::steady_clock::now();
  auto elapsed = [&] { return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count(); };
  std::vector<Child> children(nproc);
  pid_t pgid = 0;
  for (int r = 0; r < nproc; ++r) {
    // The ranks are forked, not exec'd: LibTorch, OpenBLAS and the parsed scenario are already here
    // (its only other thread is interrupt's cleanup thread, blocked in read(2) and holding no lock;
    // OpenBLAS's own workers are re-created by its atfork handler).
    const pid_t pid = fork();
    if (pid == 0) {
      setpgid(0, pgid);  // the first child leads a new group, the others join it
      prctl(PR_SET_PDEATHSIG, SIGKILL);
      if (getppid() != launcher_pid) _exit(127);  // the launcher died before prctl took effect
      interrupt::exitOnSignal(/*quiet=*/true);  // a rank stopped by a signal removes its unfinished outputs
      RankEnvironment env;
      env.rank = r;
      env.world_size = nproc;
      env.local_rank = r;
      env.master_addr = "127.0.0.1";
      env.source = "the moe-lbcheck launcher";
      env.file_store = store_path;
      int code = static_cast<int>(ExitCode::kRuntimeFailure);
      try {
        code = run_rank(env);
      } catch (const Error& e) {
        std::cerr << "moe-lbcheck: error: " << e.what() << "\n";
        code = static_cast<int>(e.code());
      } catch (const std::exception& e) {
        std::cerr << "moe-lbcheck: error: " << backend << " rank " << r << ": " << withoutBacktrace(e.what()) << "\n";
      }
      std::cout.flush();
      std::cerr.flush();
      std::fflush(nullptr);
      _exit(code);  // no destructor of the launcher's state may run in a rank
    }
    if (pid < 0) {
      const int err = errno;
      if (pgid > 0) kill(-pgid, SIGKILL);
      for (int k = 0; k < r; ++k) waitpid(children[k].pid, nullptr, 0);
      restoreSignals();
      throw RuntimeFailure(backend, -1, fmt::format("launcher: starting rank {}", r),
                           fmt::format("fork failed: {}", std::strerror(err)));
    }
    if (pgid == 0) pgid = pid;
    setpgid(pid, pgid);  // also from here: no race with the child's own call
    children[r].pid = pid;
  }

  // Wait for every rank; after the first failure the others get `grace` to end on their own.
  int running = nproc;
  int first_failure = -1;
  bool interrupted = false;
  std::optional<std::chrono::steady_clock::time_point> kill_at;
  while (running > 0) {
    int status = 0;
    const pid_t pid = waitpid(-pgid, &status, WNOHANG);
    if (pid > 0) {
      for (int r = 0; r < nproc; ++r) {
        if (children[r].pid != pid || !children[r].running) continue;
        children[r].running = false;
        children[r].status = status;
        children[r].ended_s = elapsed();
        --running;
        if (failedExit(children[r]) && first_failure < 0) {
          first_failure = r;
          if (!kill_at) kill_at = std::chrono::steady_clock::now() + grace;
        }
      }
      continue;
    }
    if (pid < 0 && errno == ECHILD) break;
    if (g_stop_signal != 0 && !interrupted) {
      interrupted = true;
      kill(-pgid, SIGTERM);
      kill_at = std::chrono::steady_clock::now() + std::chrono::seconds(2);
    }
    if (kill_at && std::chrono::steady_clock::now() >= *kill_at) {
      kill(-pgid, SIGKILL);
      for (auto& c : children) {
        if (!c.running) continue;
        waitpid(c.pid, &c.status, 0);
        c.running = false;
        c.killed_by_launcher = true;
        c.ended_s = elapsed();
        --running;
      }
      break;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  kill(-pgid, SIGKILL);  // nothing may outlive the launcher (ESRCH when the group is empty)
  restoreSignals();

  // Exit code: rank 0's when every rank exited normally with 0 or rank 0's code.
  const Child& r0 = children[0];
  bool agree = !interrupted && !r0.killed_by_launcher && WIFEXITED(r0.status);
  const int code0 = agree ? WEXITSTATUS(r0.status) : 3;
  for (const Child& c : children) {
    if (c.killed_by_launcher || !WIFEXITED(c.status)) agree = false;
    else if (WEXITSTATUS(c.status) != 0 && WEXITSTATUS(c.status) != code0) agree = false;
  }
  if (agree && code0 != static_cast<int>(ExitCode::kRuntimeFailure)) return code0;

  std::string summary;
  if (interrupted) {
    const int sig = g_stop_signal;
    std::cerr << fmt::format("moe-lbcheck: {} launcher: interrupted by signal {} ({}); every rank was stopped, "
                             "nothing was written\n",
                             backend, sig, strsignal(sig));
    return 128 + sig;  // as shells report a process ended by the signal
  }
  // The cause: a rank that failed on its own terms (not the exit code 3 with which a rank reports
  // another rank's failure) comes before any rank reporting the consequence, whatever the order in which
  // the launcher reaped them: ranks that exit within one poll interval are seen in pid order.
  for (int r = 0; r < nproc; ++r) {
    const Child& c = children[r];
    const bool consequence = WIFEXITED(c.status) && WEXITSTATUS(c.status) == static_cast<int>(ExitCode::kRuntimeFailure);
    if (!failedExit(c) || c.killed_by_launcher || consequence) continue;
    const Child* best = first_failure >= 0 ? &children[first_failure] : nullptr;
    const bool best_is_consequence = best && WIFEXITED(best->status) &&
                                     WEXITSTATUS(best->status) == static_cast<int>(ExitCode::kRuntimeFailure);
    if (!best || best_is_consequence || best->killed_by_launcher || c.ended_s < best->ended_s) first_failure = r;
  }
  if (first_failure >= 0) {
    summary = fmt::format("rank {} failed first ({} after {:.1f} s)", first_failure,
                          describe(children[first_failure]), children[first_failure].ended_s);
  } else {
    summary = "the ranks did not agree on the outcome";
  }
  std::string each;
  for (int r = 0; r < nproc; ++r) each += fmt::format("{}rank {}: {}", r ? "; " : "", r, describe(children[r]));
  std::cerr << "moe-lbcheck: error: " << backend << " launcher: " << summary << ". " << each << "\n";
  return static_cast<int>(ExitCode::kRuntimeFailure);
}

}  // namespace moe
