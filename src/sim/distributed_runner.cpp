#include "sim/distributed_runner.hpp"

#include "cuda/nccl_communicator.hpp"

#include <signal.h>
#include <unistd.h>

#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <mutex>
#include <optional>
#include <thread>

#include <fmt/format.h>
#include <nlohmann/json.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>
#include <torch/torch.h>

#include "common/errors.hpp"
#include "data/problem.hpp"
#include "sim/rank_program.hpp"

namespace moe {
namespace {

using Clock = std::chrono::steady_clock;
using nlohmann::json;

DistributedSession* g_current = nullptr;

// MOE_LBCHECK_DEBUG=1: one line per phase on stderr (rank, seconds since the process started).
void trace(int rank, const std::string& what) {
  static const bool on = [] {
    const char* v = std::getenv("MOE_LBCHECK_DEBUG");
    return v != nullptr && std::string(v) == "1";
  }();
  if (!on) return;
  static const auto t0 = Clock::now();
  std::fprintf(stderr, "[moe-lbcheck rank %d %8.3f s] %s\n", rank,
               std::chrono::duration<double>(Clock::now() - t0).count(), what.c_str());
}

std::vector<uint8_t> bytesOf(const std::string& s) { return std::vector<uint8_t>(s.begin(), s.end()); }
std::string textOf(const std::vector<uint8_t>& b) { return std::string(b.begin(), b.end()); }

std::string cleanWhat(const std::exception& e) {
  std::string what;
  if (const auto* c = dynamic_cast<const c10::Error*>(&e)) what = c->what_without_backtrace();
  else what = e.what();
  const auto backtrace = what.find("\nException raised from");
  if (backtrace != std::string::npos) what.resize(backtrace);
  while (!what.empty() && (what.back() == '\n' || what.back() == ' ')) what.pop_back();
  return what;
}

// FNV-1a, 64 bit: a fingerprint that is the same on every host for the same bytes.
struct Fnv {
  uint64_t h = 1469598103934665603ull;
  void add(const void* data, size_t n) {
    const auto* p = static_cast<const unsigned char*>(data);
    for (size_t i = 0; i < n; ++i) h = (h ^ p[i]) * 1099511628211ull;
  }
  void add(const std::string& s) { add(s.data(), s.size()); }
  void add(const at::Tensor& t) {
    const at::Tensor c = t.contiguous();
    add(c.data_ptr(), static_cast<size_t>(c.numel() * c.element_size()));
  }
  std::string hex() const { return fmt::format("{:016x}", h); }
};

std::string scenarioHash(const Scenario& sc) {
  Fnv f;
  f.add(scenarioToJsonText(sc, -1));
  return f.hex();
}

std::string inputsFingerprint(const MeshInputs& in) {
  Fnv f;
  f.add(scenarioToJsonText(in.scenario, -1));
  f.add(in.x);
  f.add(in.y);
  f.add(in.valid);
  for (const LayerWeights& w : in.layers) {
    f.add(w.router_weight);
    f.add(w.expert_in);
    f.add(w.expert_out);
  }
  return f.hex();
}

std::optional<int> envRank(const char* name) {
  const char* v = std::getenv(name);
  if (v == nullptr || *v == '\0') return std::nullopt;
  char* end = nullptr;
  const long r = std::strtol(v, &end, 10);
  if (*end != '\0') return std::nullopt;
  return static_cast<int>(r);
}

// The test hooks of the header; they fire once, at the start of the first mesh run.
void applyTestHooks(int rank) {
  if (envRank("MOE_LBCHECK_TEST_EXIT_RANK") == rank) {
    std::fprintf(stderr, "moe-lbcheck: test hook: rank %d exits with code 9\n", rank);
    std::fflush(stderr);
    std::_Exit(9);
  }
  if (envRank("MOE_LBCHECK_TEST_CRASH_RANK") == rank) {
    std::fprintf(stderr, "moe-lbcheck: test hook: rank %d aborts\n", rank);
    std::fflush(stderr);
    std::abort();
  }
  if (envRank("MOE_LBCHECK_TEST_HANG_RANK") == rank) {
    std::fprintf(stderr, "moe-lbcheck: test hook: rank %d hangs\n", rank);
    std::fflush(stderr);
    for (;;) pause();
  }
}

bool isLoopback(const std::string& addr) {
  return addr == "localhost" || addr == "::1" || addr.rfind("127.", 0) == 0;
}

}  // namespace

struct DistributedSession::Impl {
  RankEnvironment env;
  Scenario scenario;
  MeshLayout layout;
  std::chrono::milliseconds timeout{60000};
  const std::string prefix = "moe-lbcheck";
  c10::intrusive_ptr<c10d::TCPStore> store;
  std::unique_ptr<C10dCommunicator> comm;
  // The rank program's collectives: the Gloo communicator, or NCCL for --backend nccl (the session's
  // own control traffic, gathering and barriers stay on Gloo).
  std::unique_ptr<Communicator> nccl_comm;
  Communicator& meshComm() { return nccl_comm ? *nccl_comm : *comm; }
  int next_command = 0;
  bool serves_store = false;

  std::thread heartbeat;
  std::mutex heartbeat_mutex;
  std::condition_variable heartbeat_cv;
  bool heartbeat_stop = false;

  std::string key(const std::string& name) const { return prefix + "/" + name; }
  std::string storeWhere() const {
    return fmt::format("the TCPStore at {}:{} ({})", env.master_addr, env.master_port,
                       serves_store ? "served by rank 0"
                       : env.launcher_hosts_store ? "served by the moe-lbcheck launcher"
                                                  : "served by rank 0");
  }

  void postCommand(const json& command) {
    const int i = next_command++;
    store->set(key(fmt::format("cmd/{}", i)), bytesOf(command.dump()));
  }
  json waitCommand(int index);
  MeshGradients runOne(const MeshInputs& in, int index);
  void stopHeartbeat() {
    {
      std::lock_guard<std::mutex> lock(heartbeat_mutex);
      heartbeat_stop = true;
    }
    heartbeat_cv.notify_all();
    if (heartbeat.joinable()) heartbeat.join();
  }
};

DistributedSession::DistributedSession(const RankEnvironment& env, const Scenario& scenario,
                                       std::chrono::milliseconds timeout)
    : impl_(std::make_unique<Impl>()) {
  Impl& im = *impl_;
  im.env = env;
  im.scenario = scenario;
  im.layout = MeshLayout::fromScenario(scenario);
  im.timeout = timeout;
  const int rank = env.rank;

  // Ranks block in collectives; intra-op threads would only oversubscribe the cores (the emulated
  // runner does the same). OMP_NUM_THREADS, when set (torchrun sets 1), decides instead.
  if (std::getenv("OMP_NUM_THREADS") == nullptr) at::set_num_threads(1);

  trace(rank, "session: connecting to the TCPStore");
  // --- the TCPStore: rank 0 serves it unless the launcher already does.
  im.serves_store = rank == 0 && !env.launcher_hosts_store;
  c10d::TCPStoreOptions store_options;
  store_options.port = static_cast<std::uint16_t>(env.master_port);
  store_options.isServer = im.serves_store;
  store_options.waitWorkers = false;
  store_options.timeout = timeout;
  try {
    im.store = c10::make_intrusive<c10d::TCPStore>(env.master_addr, store_options);
  } catch (const std::exception& e) {
    std::string what = cleanWhat(e);
    while (!what.empty() && what.back() == '.') what.pop_back();
    if (im.serves_store) {
      const bool in_use = what.find("in use") != std::string::npos ||
                          what.find("errno: 98") != std::string::npos;
      throw UsageError(fmt::format(
          "MASTER_PORT={} cannot be used: rank 0 could not serve the rendezvous TCPStore on port {}{}: "
          "{}. Choose a free MASTER_PORT (or let `moe-lbcheck run --backend gloo --nproc N` pick one)",
          env.master_port, env.master_port, in_use ? " (the port is already in use)" : "", what));
    }
    throw RuntimeFailure("gloo", rank,
                         fmt::format("connecting to the TCPStore at {}:{}", env.master_addr, env.master_port),
                         what + fmt::format(" (is rank 0 running, and are MASTER_ADDR and MASTER_PORT "
                                            "right? timeout {:.3g} s)",
                                            timeout.count() / 1000.0));
  }

  trace(rank, "session: store connected");
  // --- the same scenario and mesh everywhere, every rank claimed once.
  json config = {{"world", env.world_size},
                 {"scenario", scenario.name},
                 {"scenario_hash", scenarioHash(scenario)},
                 {"mesh", fmt::format("dp={},pp={},cp={},mb={},vp={}", scenario.mesh.dp, scenario.mesh.pp,
                                      scenario.mesh.cp, scenario.mesh.microbatches,
                                      scenario.mesh.virtual_stages)}};
  try {
    const int64_t claims = im.store->add(im.key(fmt::format("rank/{}", rank)), 1);
    if (claims > 1)
      throw UsageError(fmt::format("two processes claim rank {} ({}): every rank must be started once",
                                   rank, env.source));
    if (rank == 0) {
      im.store->add(im.key("heartbeat"), 1);
      im.store->set(im.key("config"), bytesOf(config.dump()));
    } else {
      const json theirs = json::parse(textOf(im.store->get(im.key("config"))));
      if (theirs != config)
        throw UsageError(fmt::format(
            "rank {} and rank 0 do not run the same check: rank 0 runs {}, rank {} runs {}; start "
            "every rank with the same scenario, options and world size",
            rank, theirs.dump(), rank, config.dump()));
    }
  } catch (const Error&) {
    throw;
  } catch (const std::exception& e) {
    throw RuntimeFailure("gloo", rank, "rendezvous with rank 0", im.storeWhere() + ": " + cleanWhat(e));
  }

  // --- rank 0's heartbeat, on a store connection of its own (a TCPStore client is not shared
  // between threads).
  if (rank == 0) {
    c10::intrusive_ptr<c10d::TCPStore> client;
    try {
      c10d::TCPStoreOptions o = store_options;
      o.isServer = false;
      o.port = im.store->getPort();
      client = c10::make_intrusive<c10d::TCPStore>(env.master_addr, o);
    } catch (const std::exception& e) {
      throw RuntimeFailure("gloo", rank, "connecting the heartbeat to the TCPStore", cleanWhat(e));
    }
    const std::string beat_key = im.key("heartbeat");
    im.heartbeat = std::thread([&im, client, beat_key] {
      std::unique_lock<std::mutex> lock(im.heartbeat_mutex);
      while (!im.heartbeat_stop) {
        lock.unlock();
        try {
          client->add(beat_key, 1);
        } catch (...) {
          return;
        }
        lock.lock();
        im.heartbeat_cv.wait_for(lock, std::chrono::milliseconds(500), [&] { return im.heartbeat_stop; });
      }
    });
  }

  // --- the process groups.
  trace(rank, "session: creating the process groups");
  C10dOptions comm_options;
  comm_options.timeout = timeout;
  comm_options.prefix = im.prefix;
  if (const char* ifname = std::getenv("GLOO_SOCKET_IFNAME"); ifname != nullptr && *ifname != '\0') {
    std::string first(ifname);
    first = first.substr(0, first.find(','));
    comm_options.interface = first;
  } else if (isLoopback(env.master_addr)) {
    comm_options.hostname = "127.0.0.1";
  }
  try {
    im.comm = std::make_unique<C10dCommunicator>(im.store, rank, im.layout, comm_options);
    if (env.backend == "nccl")
      im.nccl_comm = makeNcclCommunicator(*im.store, im.prefix, rank, env.local_rank, im.layout);
  } catch (...) {
    im.stopHeartbeat();
    throw;
  }
  g_current = this;
  trace(rank, "session: ready");
}

DistributedSession::~DistributedSession() {
  if (g_current == this) g_current = nullptr;
  if (!impl_) return;
  impl_->stopHeartbeat();
  impl_->nccl_comm.reset();
  impl_->comm.reset();
  impl_->store.reset();
}

DistributedSession* DistributedSession::current() { return g_current; }
int DistributedSession::rank() const { return impl_->env.rank; }
int DistributedSession::worldSize() const { return impl_->env.world_size; }
C10dCommunicator& DistributedSession::communicator() { return *impl_->comm; }

MeshGradients DistributedSession::Impl::runOne(const MeshInputs& in, int index) {
  const auto t0 = Clock::now();
  const int rank = env.rank;
  trace(rank, fmt::format("mesh run {}: start", index));
  if (index == 0) applyTestHooks(rank);
  const MeshLayout& L = in.layout;
  if (L.dp != layout.dp || L.pp != layout.pp || L.cp != layout.cp)
    throw RuntimeFailure("gloo", rank, fmt::format("mesh run {}", index),
                         fmt::format("the run's mesh dp={} pp={} cp={} is not the session's dp={} pp={} cp={}",
                                     L.dp, L.pp, L.cp, layout.dp, layout.pp, layout.cp));
  RankResult result;
  try {
    result = runRank(in, meshComm());
    meshComm().flushSends();
  } catch (const Error&) {
    throw;
  } catch (const std::exception& e) {
    throw RuntimeFailure("gloo", rank, fmt::format("rank program (mesh run {})", index), cleanWhat(e));
  }
  comm->flushSends();

  MeshGradients out;
  const RankCoords me = L.coordsOf(rank);
  if (rank == 0) {
    out.router_grad.resize(L.layers);
    for (int l = 0; l < L.layers; ++l) {
      const int stage = (l / L.layersPerChunk()) % L.pp;
      const int owner = L.rankOf({0, stage, 0});
      if (owner == 0) {
        out.router_grad[l] = result.router_grad.at(l);
        continue;
      }
      at::Tensor buffer = at::empty({in.layers[l].router_weight.numel()}, at::kDouble);
      comm->recv(buffer, owner, kGatherTagBase + l);
      out.router_grad[l].assign(buffer.data_ptr<double>(), buffer.data_ptr<double>() + buffer.numel());
    }
    if (const char* dir = std::getenv("MOE_LBCHECK_TEST_DUMP_MESH_RUNS"); dir != nullptr && *dir) {
      const json dump = {{"index", index},
                         {"knobs", {in.knobs.main_loss_weight, in.knobs.aux_coeff, in.knobs.z_loss_coeff}},
                         {"router_grad", out.router_grad}};
      std::ofstream f(fmt::format("{}/mesh_run_{}.json", dir, index), std::ios::trunc);
      f << dump.dump();
    }
  } else if (me.dp == 0 && me.cp == 0) {
    for (const auto& [layer, grad] : result.router_grad) {
      const at::Tensor t = at::from_blob(const_cast<double*>(grad.data()),
                                         {static_cast<int64_t>(grad.size())}, at::kDouble);
      comm->send(t, 0, kGatherTagBase + layer);
    }
    comm->flushSends();
  }
  out.seconds = std::chrono::duration<double>(Clock::now() - t0).count();
  trace(rank, fmt::format("mesh run {}: done", index));
  return out;
}

json DistributedSession::Impl::waitCommand(int index) {
  const int rank = env.rank;
  const std::string cmd_key = key(fmt::format("cmd/{}", index));
  const std::string op = index == 0 ? "waiting for rank 0's first mesh run"
                                    : fmt::format("waiting for rank 0's next step after mesh run {}", index - 1);
  auto fail = [&](const std::string& what) { return RuntimeFailure("gloo", rank, op, what); };
  int64_t last_beat = -1;
  auto last_beat_change = Clock::now();
  auto last_beat_check = Clock::now() - std::chrono::seconds(10);
  for (;;) {
    try {
      if (store->check({cmd_key})) return json::parse(textOf(store->get(cmd_key)));
      const auto now = Clock::now();
      if (now - last_beat_check >= std::chrono::seconds(1)) {
        last_beat_check = now;
        const int64_t beat = store->add(key("heartbeat"), 0);
        if (beat != last_beat) {
          last_beat = beat;
          last_beat_change = now;
        } else if (now - last_beat_change > timeout) {
          throw fail(fmt::format("rank 0 has sent no heartbeat for {:.3g} s: it hangs or was stopped",
                                 std::chrono::duration<double>(now - last_beat_change).count()));
        }
      }
    } catch (const Error&) {
      throw;
    } catch (const std::exception& e) {
      throw fail(fmt::format("lost {}{}: {}", storeWhere(),
                             serves_store || !env.launcher_hosts_store ? "; rank 0 has probably exited" : "",
                             cleanWhat(e)));
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
}

MeshGradients DistributedSession::runLeader(const MeshInputs& inputs) {
  Impl& im = *impl_;
  const int index = im.next_command;
  json command = {{"kind", "run"},
                  {"index", index},
                  {"knobs", {inputs.knobs.main_loss_weight, inputs.knobs.aux_coeff, inputs.knobs.z_loss_coeff}},
                  {"inputs", inputsFingerprint(inputs)}};
  try {
    im.postCommand(command);
  } catch (const std::exception& e) {
    throw RuntimeFailure("gloo", 0, fmt::format("posting mesh run {}", index),
                         im.storeWhere() + ": " + cleanWhat(e));
  }
  return im.runOne(inputs, index);
}

int DistributedSession::serve(const Scenario& scenario) {
  Impl& im = *impl_;
  std::optional<ProblemData> data;
  for (int index = 0;; ++index) {
    const json command = im.waitCommand(index);
    im.next_command = index + 1;
    const std::string kind = command.value("kind", "");
    if (kind == "done") {
      trace(im.env.rank, "serve: done, final barrier");
      im.comm->barrier();
      return 0;
    }
    if (kind == "abort") {
      const int code = command.value("code", 3);
      throw Error(static_cast<ExitCode>(code),
                  fmt::format("gloo rank {}: stopping because rank 0 failed: {}", im.env.rank,
                              command.value("message", std::string("(no message)"))));
    }
    if (!data) data = loadProblem(scenario);
    const json& k = command.at("knobs");
    RunKnobs knobs;
    knobs.main_loss_weight = k.at(0).get<double>();
    knobs.aux_coeff = k.at(1).get<double>();
    knobs.z_loss_coeff = k.at(2).get<double>();
    const MeshInputs inputs = makeMeshInputs(scenario, *data, knobs);
    if (inputsFingerprint(inputs) != command.value("inputs", std::string()))
      throw UsageError(fmt::format(
          "gloo rank {}: the inputs of mesh run {} differ from rank 0's (fingerprint {} against {}): "
          "every rank must load the same scenario and data files",
          im.env.rank, index, inputsFingerprint(inputs), command.value("inputs", std::string())));
    im.runOne(inputs, index);
  }
}

void DistributedSession::finish() {
  Impl& im = *impl_;
  try {
    im.postCommand({{"kind", "done"}});
  } catch (const std::exception& e) {
    throw RuntimeFailure("gloo", 0, "posting the end of the run", im.storeWhere() + ": " + cleanWhat(e));
  }
  trace(0, "finish: final barrier");
  im.comm->barrier();
  im.stopHeartbeat();
  trace(0, "finish: done");
}

void DistributedSession::abort(const std::string& message, int exit_code) noexcept {
  try {
    impl_->postCommand({{"kind", "abort"}, {"code", exit_code}, {"message", message}});
  } catch (...) {
  }
}

MeshGradients runDistributedMesh(const MeshInputs& inputs) {
  DistributedSession* session = DistributedSession::current();
  if (session == nullptr || session->rank() != 0)
    throw UsageError(
        "backend 'gloo' runs one process per rank: use `moe-lbcheck run SCENARIO --backend gloo "
        "[--nproc N]`, or start the ranks with torchrun, srun or mpirun");
  return session->runLeader(inputs);
}

int runDistributedRank(const RankEnvironment& env, const Scenario& scenario,
                       const std::function<int()>& leader) {
  std::unique_ptr<DistributedSession> session;
  auto die = [](int code, const std::string& message) {
    std::cout.flush();
    std::cerr << "moe-lbcheck: error: " << message << "\n";
    std::cerr.flush();
    std::fflush(nullptr);
    std::_Exit(code);  // see the header: no destructor may wait on a dead peer
  };
  try {
    session = std::make_unique<DistributedSession>(env, scenario, distributedTimeout());
    int code = 0;
    if (env.rank == 0) {
      try {
        code = leader();
      } catch (const Error& e) {
        session->abort(e.what(), static_cast<int>(e.code()));
        throw;
      } catch (const std::exception& e) {
        session->abort(cleanWhat(e), static_cast<int>(ExitCode::kRuntimeFailure));
        throw;
      }
      session->finish();
    } else {
      code = session->serve(scenario);
    }
    trace(env.rank, "tearing down");
    session.reset();
    trace(env.rank, "exiting");
    return code;
  } catch (const Error& e) {
    die(static_cast<int>(e.code()), e.what());
  } catch (const std::exception& e) {
    die(static_cast<int>(ExitCode::kRuntimeFailure),
        RuntimeFailure("gloo", env.rank, "rank program", cleanWhat(e)).what());
  }
  return static_cast<int>(ExitCode::kRuntimeFailure);
}

}  // namespace moe
