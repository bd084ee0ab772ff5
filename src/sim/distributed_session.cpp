#include "sim/distributed_session.hpp"

#include <cstdlib>

#include <fmt/format.h>
#include <nlohmann/json.hpp>
#include <torch/csrc/distributed/c10d/FileStore.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>
#include <torch/torch.h>

#include "common/errors.hpp"
#include "sim/trace.hpp"

namespace moe {
namespace {

using nlohmann::json;

std::vector<uint8_t> bytesOf(const std::string& s) { return std::vector<uint8_t>(s.begin(), s.end()); }
std::string textOf(const std::vector<uint8_t>& b) { return std::string(b.begin(), b.end()); }

bool isLoopback(const std::string& addr) {
  return addr == "localhost" || addr == "::1" || addr.rfind("127.", 0) == 0;
}

// FNV-1a, 64 bit, of the scenario: the same on every host for the same scenario.
std::string scenarioHash(const Scenario& sc) {
  uint64_t h = 1469598103934665603ull;
  for (unsigned char c : scenarioToJsonText(sc, -1)) h = (h ^ c) * 1099511628211ull;
  return fmt::format("{:016x}", h);
}

}  // namespace

struct DistributedSession::Impl {
  RankEnvironment env;
  SessionOptions options;
  MeshLayout layout;
  const std::string prefix = "moe-lbcheck";
  c10::intrusive_ptr<c10d::Store> store;
  int store_port = 0;  // the TCPStore's port (heartbeat connection)
  std::unique_ptr<C10dCommunicator> comm;
  std::unique_ptr<Communicator> mesh_comm;  // when the backend brings its own
  std::unique_ptr<ControlChannel> channel;
  bool serves_store = false;

  std::string storeWhere() const {
    if (!env.file_store.empty()) return "the FileStore " + env.file_store + " of the moe-lbcheck launcher";
    return fmt::format("the TCPStore at {}:{} ({})", env.master_addr, env.master_port,
                       env.launcher_hosts_store ? "served by the launcher" : "served by rank 0");
  }
};

DistributedSession::DistributedSession(const RankEnvironment& env, const Scenario& scenario,
                                       const SessionOptions& options)
    : impl_(std::make_unique<Impl>()) {
  Impl& im = *impl_;
  im.env = env;
  im.options = options;
  im.layout = MeshLayout::fromScenario(scenario);
  const int rank = env.rank;
  const std::string& backend = options.backend;
  const std::chrono::milliseconds timeout = options.timeout;

  // Ranks block in collectives; intra-op threads would only oversubscribe the cores (the emulated
  // backend does the same). OMP_NUM_THREADS, when set (torchrun sets 1), decides instead.
  if (std::getenv("OMP_NUM_THREADS") == nullptr) at::set_num_threads(1);

  trace(rank, "session: connecting to the store");
  c10d::TCPStoreOptions store_options;
  if (!env.file_store.empty()) {
    // The local launcher's FileStore (-1 workers: the launcher removes its directory).
    try {
      im.store = c10::make_intrusive<c10d::FileStore>(env.file_store, -1);
      im.store->setTimeout(timeout);
    } catch (const std::exception& e) {
      throw RuntimeFailure(backend, rank, "opening " + im.storeWhere(), withoutBacktrace(e.what()));
    }
  } else {
    // --- the TCPStore: rank 0 serves it unless the launcher already does.
    im.serves_store = rank == 0 && !env.launcher_hosts_store;
    store_options.port = static_cast<std::uint16_t>(env.master_port);
    store_options.isServer = im.serves_store;
    store_options.waitWorkers = false;
    store_options.timeout = timeout;
    try {
      auto tcp = c10::make_intrusive<c10d::TCPStore>(env.master_addr, store_options);
      im.store_port = tcp->getPort();
      im.store = tcp;
    } catch (const std::exception& e) {
      std::string what = withoutBacktrace(e.what());
      while (!what.empty() && what.back() == '.') what.pop_back();
      if (im.serves_store) {
        const bool in_use = what.find("in use") != std::string::npos || what.find("errno: 98") != std::string::npos;
        throw UsageError(fmt::format(
            "MASTER_PORT={} cannot be used: rank 0 could not serve the rendezvous TCPStore on port {}{}: {}. "
            "Choose a free MASTER_PORT (or let `moe-lbcheck run --backend {} --nproc N` start the ranks)",
            env.master_port, env.master_port, in_use ? " (the port is already in use)" : "", what, backend));
      }
      throw RuntimeFailure(backend, rank,
                           fmt::format("connecting to the TCPStore at {}:{}", env.master_addr, env.master_port),
                           what + fmt::format(" (is rank 0 running, and are MASTER_ADDR and MASTER_PORT right? "
                                              "timeout {:.3g} s)",
                                              timeout.count() / 1000.0));
    }
  }

  trace(rank, "session: store connected");
  // --- the same scenario and mesh everywhere, every rank claimed once.
  const MeshConfig& m = scenario.mesh;
  const json config = {{"world", env.world_size},
                       {"backend", backend},
                       {"scenario", scenario.name},
                       {"scenario_hash", scenarioHash(scenario)},
                       {"mesh", fmt::format("tp={},cp={},dp={},pp={},ep={},mb={},vp={}", m.tp, m.cp, m.dp, m.pp, m.ep,
                                            m.microbatches, m.virtual_stages)}};
  const std::string key_prefix = im.prefix + "/";
  try {
    const int64_t claims = im.store->add(key_prefix + fmt::format("rank/{}", rank), 1);
    if (claims > 1)
      throw UsageError(fmt::format("two processes claim rank {} ({}): every rank must be started once", rank,
                                   env.source));
    if (rank == 0) {
      im.store->add(key_prefix + "heartbeat", 1);
      im.store->set(key_prefix + "config", bytesOf(config.dump()));
    } else {
      const json theirs = json::parse(textOf(im.store->get(key_prefix + "config")));
      if (theirs != config)
        throw UsageError(fmt::format(
            "rank {} and rank 0 do not run the same check: rank 0 runs {}, rank {} runs {}; start every rank "
            "with the same scenario, options and world size",
            rank, theirs.dump(), rank, config.dump()));
    }
  } catch (const Error&) {
    throw;
  } catch (const std::exception& e) {
    throw RuntimeFailure(backend, rank, "rendezvous with rank 0", im.storeWhere() + ": " + withoutBacktrace(e.what()));
  }

  // --- rank 0's heartbeat, on a store connection of its own (a TCPStore client is not shared
  // between threads).
  c10::intrusive_ptr<c10d::Store> heartbeat_store;
  if (rank == 0) {
    try {
      if (!env.file_store.empty()) {
        heartbeat_store = c10::make_intrusive<c10d::FileStore>(env.file_store, -1);
      } else {
        c10d::TCPStoreOptions o = store_options;
        o.isServer = false;
        o.port = static_cast<std::uint16_t>(im.store_port);
        heartbeat_store = c10::make_intrusive<c10d::TCPStore>(env.master_addr, o);
      }
    } catch (const std::exception& e) {
      throw RuntimeFailure(backend, rank, "connecting the heartbeat to the TCPStore", withoutBacktrace(e.what()));
    }
  }
  ControlChannelOptions channel_options;
  channel_options.prefix = im.prefix;
  channel_options.backend = backend;
  channel_options.timeout = timeout;
  channel_options.store_description = im.storeWhere();
  im.channel = std::make_unique<ControlChannel>(im.store, heartbeat_store, rank, channel_options);
  im.channel->startHeartbeat();

  // --- the process groups.
  trace(rank, "session: creating the process groups");
  C10dOptions comm_options;
  comm_options.timeout = timeout;
  comm_options.prefix = im.prefix;
  if (const char* ifname = std::getenv("GLOO_SOCKET_IFNAME"); ifname != nullptr && *ifname != '\0') {
    std::string first(ifname);
    comm_options.interface = first.substr(0, first.find(','));
  } else if (!env.file_store.empty() || isLoopback(env.master_addr)) {
    comm_options.hostname = "127.0.0.1";  // a local launch: Gloo's pairs listen on loopback only
  }
  im.comm = std::make_unique<C10dCommunicator>(im.store, rank, im.layout, comm_options);
  if (options.mesh_communicator)
    im.mesh_comm = options.mesh_communicator(*im.store, im.prefix, rank, env.local_rank, im.layout);
  trace(rank, "session: ready");
}

DistributedSession::~DistributedSession() {
  if (!impl_) return;
  if (impl_->channel) impl_->channel->stopHeartbeat();
  impl_->mesh_comm.reset();
  impl_->comm.reset();
  impl_->channel.reset();
  impl_->store.reset();
}

int DistributedSession::rank() const { return impl_->env.rank; }
int DistributedSession::worldSize() const { return impl_->env.world_size; }
const std::string& DistributedSession::backend() const { return impl_->options.backend; }
std::chrono::milliseconds DistributedSession::timeout() const { return impl_->options.timeout; }
const MeshLayout& DistributedSession::layout() const { return impl_->layout; }
C10dCommunicator& DistributedSession::control() { return *impl_->comm; }
Communicator& DistributedSession::mesh() { return impl_->mesh_comm ? *impl_->mesh_comm : *impl_->comm; }
ControlChannel& DistributedSession::channel() { return *impl_->channel; }

}  // namespace moe
