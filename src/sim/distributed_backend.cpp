#include "sim/distributed_backend.hpp"

#include <chrono>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <optional>

#include <fmt/format.h>
#include <nlohmann/json.hpp>
#include <torch/torch.h>

#include "common/errors.hpp"
#include "sim/rank_program.hpp"
#include "sim/test_hooks.hpp"
#include "sim/trace.hpp"

namespace moe {
namespace {

using Clock = std::chrono::steady_clock;
using nlohmann::json;

// Tags of the messages that carry a rank's state to rank 0 (above every pipeline tag).
constexpr int kGatherTagBase = 1 << 24;

// FNV-1a, 64 bit: a fingerprint that is the same on every host for the same bytes.
struct Fnv {
  uint64_t h = 1469598103934665603ull;
  void add(const void* data, size_t n) {
    const auto* p = static_cast<const unsigned char*>(data);
    for (size_t i = 0; i < n; ++i) h = (h ^ p[i]) * 1099511628211ull;
  }
  template <class T>
  void add(const std::vector<T>& v) {
    add(v.data(), v.size() * sizeof(T));
  }
  std::string hex() const { return fmt::format("{:016x}", h); }
};

// The scenario and every input array of a request: equal on two ranks iff they load the same problem.
std::string requestFingerprint(const MeshRequest& request) {
  Fnv f;
  const std::string text = scenarioToJsonText(*request.scenario, -1);
  f.add(text.data(), text.size());
  const ProblemData& d = *request.data;
  f.add(d.x);
  f.add(d.y);
  f.add(d.valid);
  for (int l = 0; l < d.layers; ++l) {
    f.add(d.router_weight[l]);
    f.add(d.expert_in[l]);
    f.add(d.expert_out[l]);
  }
  return f.hex();
}

json commandOf(const MeshRequest& request) {
  const RunKnobs& k = request.knobs;
  return {{"kind", "run"},
          {"knobs", {k.main_loss_weight, k.aux_coeff, k.z_loss_coeff}},
          {"detach_router_inputs", k.detach_router_inputs},
          {"record_router_inputs", request.record_router_inputs},
          {"inputs", requestFingerprint(request)}};
}

// A rank's state travels to rank 0 as a sequence of tensors with consecutive tags: a header length,
// the header (the layers held, then per input record its layer, microbatch, rows, width and top-k),
// the gradients, then each record's arrays.
class StateMessages {
 public:
  StateMessages(Communicator& comm, int peer) : comm_(comm), peer_(peer) {}

  void send(const at::Tensor& t) { comm_.send(t.contiguous(), peer_, kGatherTagBase + tag_++); }
  at::Tensor recv(int64_t numel, at::ScalarType dtype) {
    at::Tensor t = at::empty({numel}, dtype);
    comm_.recv(t, peer_, kGatherTagBase + tag_++);
    return t;
  }

 private:
  Communicator& comm_;
  int peer_;
  int tag_ = 0;
};

at::Tensor doublesTensor(const std::vector<double>& v) {
  return at::from_blob(const_cast<double*>(v.data()), {static_cast<int64_t>(v.size())}, at::kDouble).clone();
}
at::Tensor longsTensor(const std::vector<std::int64_t>& v) {
  return at::from_blob(const_cast<std::int64_t*>(v.data()), {static_cast<int64_t>(v.size())}, at::kLong).clone();
}
template <class T>
std::vector<T> vectorOf(const at::Tensor& t) {
  return std::vector<T>(t.data_ptr<T>(), t.data_ptr<T>() + t.numel());
}

void sendState(Communicator& comm, const RankState& state) {
  StateMessages out(comm, 0);
  std::vector<std::int64_t> header{static_cast<std::int64_t>(state.router_grad.size())};
  for (const auto& [layer, grad] : state.router_grad) header.push_back(layer), header.push_back(grad.size());
  header.push_back(static_cast<std::int64_t>(state.inputs.size()));
  for (const RouterInputRecord& r : state.inputs) {
    const std::int64_t n = static_cast<std::int64_t>(r.sequence.size());
    header.insert(header.end(), {r.layer, r.microbatch, n, n > 0 ? static_cast<std::int64_t>(r.rows.size()) / n : 0,
                                 n > 0 ? static_cast<std::int64_t>(r.topk.size()) / n : 0});
  }
  out.send(longsTensor({static_cast<std::int64_t>(header.size())}));
  out.send(longsTensor(header));
  for (const auto& [layer, grad] : state.router_grad) out.send(doublesTensor(grad));
  for (const RouterInputRecord& r : state.inputs) {
    out.send(doublesTensor(r.rows));
    out.send(longsTensor(r.sequence));
    out.send(longsTensor(r.position));
    out.send(longsTensor(std::vector<std::int64_t>(r.valid.begin(), r.valid.end())));
    out.send(longsTensor(r.topk));
  }
}

RankState receiveState(Communicator& comm, int rank, const MeshLayout& layout) {
  StateMessages in(comm, rank);
  const int64_t header_size = in.recv(1, at::kLong).item<int64_t>();
  const std::vector<std::int64_t> header = vectorOf<std::int64_t>(in.recv(header_size, at::kLong));
  RankState state;
  state.rank = rank;
  state.coords = layout.coordsOf(rank);
  std::size_t at = 0;
  const std::int64_t layers = header.at(at++);
  std::vector<std::pair<int, std::int64_t>> sizes;
  for (std::int64_t i = 0; i < layers; ++i, at += 2) sizes.push_back({static_cast<int>(header.at(at)), header.at(at + 1)});
  for (const auto& [layer, size] : sizes) state.router_grad[layer] = vectorOf<double>(in.recv(size, at::kDouble));
  const std::int64_t records = header.at(at++);
  for (std::int64_t i = 0; i < records; ++i, at += 5) {
    RouterInputRecord r;
    r.layer = static_cast<int>(header.at(at));
    r.microbatch = static_cast<int>(header.at(at + 1));
    const std::int64_t n = header.at(at + 2), width = header.at(at + 3), k = header.at(at + 4);
    r.rows = vectorOf<double>(in.recv(n * width, at::kDouble));
    r.sequence = vectorOf<std::int64_t>(in.recv(n, at::kLong));
    r.position = vectorOf<std::int64_t>(in.recv(n, at::kLong));
    for (std::int64_t v : vectorOf<std::int64_t>(in.recv(n, at::kLong))) r.valid.push_back(v != 0 ? 1 : 0);
    r.topk = vectorOf<std::int64_t>(in.recv(n * k, at::kLong));
    state.inputs.push_back(std::move(r));
  }
  return state;
}

// One mesh run on this rank, then every rank's state gathered on rank 0 (the others return only
// their own).
MeshRunResult runOnThisRank(DistributedSession& session, const MeshRequest& request, int index) {
  const auto t0 = Clock::now();
  const int rank = session.rank();
  const std::string& backend = session.backend();
  trace(rank, fmt::format("mesh run {}: start", index));
  if (index == 0) TestHooks::fromEnvironment().applyAtFirstMeshRun(rank);
  const MeshLayout& L = session.layout();
  RankState own;
  try {
    const MeshInputs inputs = makeMeshInputs(request);
    if (inputs.layout.world() != L.world() || inputs.layout.dp != L.dp || inputs.layout.pp != L.pp ||
        inputs.layout.cp != L.cp || inputs.layout.tp != L.tp)
      throw RuntimeFailure(backend, rank, fmt::format("mesh run {}", index),
                           "the run's mesh is not the session's");
    own = runRank(inputs, session.mesh());
    session.mesh().flushSends();
  } catch (const Error&) {
    throw;
  } catch (const std::exception& e) {
    throw RuntimeFailure(backend, rank, fmt::format("rank program (mesh run {})", index), withoutBacktrace(e.what()));
  }
  session.control().flushSends();

  MeshRunResult out;
  if (rank == 0) {
    out.ranks.resize(static_cast<std::size_t>(L.world()));
    out.ranks[0] = std::move(own);
    for (int r = 1; r < L.world(); ++r) out.ranks[r] = receiveState(session.control(), r, L);
    const TestHooks& hooks = TestHooks::fromEnvironment();
    if (!hooks.dump_mesh_runs_dir.empty()) {
      const RunKnobs& k = request.knobs;
      const json dump = {{"index", index},
                         {"knobs", {k.main_loss_weight, k.aux_coeff, k.z_loss_coeff}},
                         {"detach_router_inputs", k.detach_router_inputs},
                         {"router_grad", out.layerGradients(L.layers)}};
      std::ofstream f(fmt::format("{}/mesh_run_{}.json", hooks.dump_mesh_runs_dir, index), std::ios::trunc);
      f << dump.dump();
    }
  } else {
    sendState(session.control(), own);
    session.control().flushSends();
  }
  out.seconds = std::chrono::duration<double>(Clock::now() - t0).count();
  trace(rank, fmt::format("mesh run {}: done", index));
  return out;
}

}  // namespace

MeshRunResult DistributedBackend::run(const MeshRequest& request) {
  if (!posted_a_command_) TestHooks::fromEnvironment().applyBeforeFirstCommand(session_.rank());
  posted_a_command_ = true;
  const int index = session_.channel().post(commandOf(request).dump());
  return runOnThisRank(session_, request, index);
}

int serveMeshRuns(DistributedSession& session, const Scenario& input) {
  const int rank = session.rank();
  // Rank 0's checks run the resolved scenario (runChecks); so do its mesh runs here.
  const Scenario scenario = resolveScenario(input);
  std::optional<ProblemData> data;
  for (int index = 0;; ++index) {
    const std::string waiting_for = index == 0 ? "waiting for rank 0's first mesh run"
                                               : fmt::format("waiting for rank 0's next step after mesh run {}", index - 1);
    const json command = json::parse(session.channel().wait(index, waiting_for));
    const std::string kind = command.value("kind", "");
    if (kind == "done") {
      trace(rank, "serve: done, final barrier");
      session.control().barrier();
      return 0;
    }
    if (kind == "abort") {
      const int code = command.value("code", 3);
      throw Error(static_cast<ExitCode>(code),
                  fmt::format("{} rank {}: stopping because rank 0 failed: {}", session.backend(), rank,
                              command.value("message", std::string("(no message)"))));
    }
    if (!data) data = loadProblem(scenario);
    const json& k = command.at("knobs");
    MeshRequest request;
    request.scenario = &scenario;
    request.data = &*data;
    request.knobs.main_loss_weight = k.at(0).get<double>();
    request.knobs.aux_coeff = k.at(1).get<double>();
    request.knobs.z_loss_coeff = k.at(2).get<double>();
    request.knobs.detach_router_inputs = command.value("detach_router_inputs", false);
    request.record_router_inputs = command.value("record_router_inputs", false);
    const std::string theirs = command.value("inputs", std::string());
    if (requestFingerprint(request) != theirs)
      throw UsageError(fmt::format(
          "{} rank {}: the inputs of mesh run {} differ from rank 0's (fingerprint {} against {}): every rank "
          "must load the same scenario and data files",
          session.backend(), rank, index, requestFingerprint(request), theirs));
    runOnThisRank(session, request, index);
  }
}

int runDistributedRank(const RankEnvironment& env, const Scenario& scenario, const SessionOptions& options,
                       const std::function<int(MeshBackend&)>& leader) {
  std::unique_ptr<DistributedSession> session;
  auto die = [](int code, const std::string& message) {
    std::cout.flush();
    std::cerr << "moe-lbcheck: error: " << message << "\n";
    std::cerr.flush();
    std::fflush(nullptr);
    std::_Exit(code);  // no destructor may wait on a dead peer
  };
  // Rank 0, best effort: tells the other ranks that it failed and with which exit code.
  auto abortOthers = [&session](const std::string& message, int code) {
    try {
      session->channel().post(json{{"kind", "abort"}, {"code", code}, {"message", message}}.dump());
    } catch (...) {
    }
  };
  try {
    session = std::make_unique<DistributedSession>(env, scenario, options);
    int code = 0;
    if (env.rank == 0) {
      DistributedBackend backend(*session);
      try {
        code = leader(backend);
      } catch (const Error& e) {
        abortOthers(e.what(), static_cast<int>(e.code()));
        throw;
      } catch (const std::exception& e) {
        abortOthers(withoutBacktrace(e.what()), static_cast<int>(ExitCode::kRuntimeFailure));
        throw;
      }
      session->channel().post(json{{"kind", "done"}}.dump());
      trace(0, "finish: final barrier");
      session->control().barrier();
      session->channel().stopHeartbeat();
    } else {
      code = serveMeshRuns(*session, scenario);
    }
    trace(env.rank, "tearing down");
    session.reset();
    trace(env.rank, "exiting");
    return code;
  } catch (const Error& e) {
    die(static_cast<int>(e.code()), e.what());
  } catch (const std::exception& e) {
    die(static_cast<int>(ExitCode::kRuntimeFailure),
        RuntimeFailure(options.backend, env.rank, "rank program", withoutBacktrace(e.what())).what());
  }
  return static_cast<int>(ExitCode::kRuntimeFailure);
}

}  // namespace moe
