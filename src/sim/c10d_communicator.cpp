#include "sim/c10d_communicator.hpp"

#include <cerrno>
#include <cmath>
#include <cstdlib>
#include <deque>
#include <map>
#include <vector>

#include <fmt/format.h>
#include <torch/torch.h>

#ifdef MOE_HAVE_GLOO
#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#endif

#include "common/errors.hpp"
#include "common/progress.hpp"

namespace moe {

std::chrono::milliseconds distributedTimeout() {
  const char* text = std::getenv("MOE_LBCHECK_TIMEOUT_S");
  if (text == nullptr || *text == '\0') return std::chrono::milliseconds(60000);
  char* end = nullptr;
  errno = 0;
  const double seconds = std::strtod(text, &end);
  if (errno != 0 || end == text || *end != '\0' || !std::isfinite(seconds) || seconds <= 0 ||
      seconds > 86400.0)
    throw UsageError(fmt::format(
        "MOE_LBCHECK_TIMEOUT_S='{}' is not a valid timeout: expected a number of seconds in (0, 86400]",
        text));
  return std::chrono::milliseconds(static_cast<long long>(std::ceil(seconds * 1000.0)));
}

#ifdef MOE_HAVE_GLOO
bool glooAvailable() { return true; }
#else
bool glooAvailable() { return false; }
#endif

namespace {

// Gloo prefixes its messages with "[/path/to/file.cc:123] "; the user needs the rest.
std::string cleanMessage(std::string what) {
  what = withoutBacktrace(std::move(what));
  while (!what.empty() && what.front() == '[') {
    const auto close = what.find("] ");
    if (close == std::string::npos) break;
    const std::string inside = what.substr(1, close - 1);
    if (inside.find(".cc:") == std::string::npos && inside.find(".h:") == std::string::npos &&
        inside.find(".cpp:") == std::string::npos)
      break;
    what.erase(0, close + 2);
  }
  while (!what.empty() && (what.back() == '\n' || what.back() == ' ')) what.pop_back();
  return what;
}

std::string joinRanks(const std::vector<int>& ranks) {
  std::string s;
  for (int r : ranks) s += (s.empty() ? "" : ", ") + std::to_string(r);
  return s;
}

}  // namespace

#ifdef MOE_HAVE_GLOO

namespace {

struct Group {
  std::vector<int> members;  // global ranks in group-rank order
  int group_rank = 0;
  c10::intrusive_ptr<c10d::ProcessGroupGloo> pg;  // null for a group of one
};

struct PendingSend {
  c10::intrusive_ptr<c10d::Work> work;
  at::Tensor buffer;  // kept alive until the send has completed
  int dst = 0, tag = 0;
};

}  // namespace

struct C10dCommunicator::Impl {
  int rank = 0;
  MeshLayout layout;
  C10dOptions options;
  std::shared_ptr<::gloo::transport::Device> device;
  std::map<CommGroup, Group> groups;
  std::deque<PendingSend> pending;
  bool failed = false;

  // Runs `f`; any exception becomes RuntimeFailure("gloo", rank, op, what + context) and marks the
  // communicator failed.
  template <class F>
  void guarded(const std::string& op, const std::string& context, F&& f) {
    if (failed)
      throw RuntimeFailure("gloo", rank, op, "not attempted: an earlier operation of this rank failed");
    try {
      f();
      progress::advance();  // a completed operation is progress (the control channel's heartbeat)
    } catch (const RuntimeFailure&) {
      failed = true;
      throw;
    } catch (const c10::Error& e) {
      failed = true;
      throw RuntimeFailure("gloo", rank, op, cleanMessage(e.what_without_backtrace()) + context);
    } catch (const std::exception& e) {
      failed = true;
      throw RuntimeFailure("gloo", rank, op, cleanMessage(e.what()) + context);
    }
  }

  const Group& group(CommGroup kind) const { return groups.at(kind); }
  std::string timeoutText() const {
    return fmt::format("timeout {:.3g} s", options.timeout.count() / 1000.0);
  }
};

C10dCommunicator::C10dCommunicator(const c10::intrusive_ptr<c10d::Store>& store, int rank,
                                   const MeshLayout& layout, const C10dOptions& options)
    : impl_(std::make_unique<Impl>()) {
  Impl& im = *impl_;
  im.rank = rank;
  im.layout = layout;
  im.options = options;
  const int world = layout.world();
  if (rank < 0 || rank >= world)
    throw RuntimeFailure("gloo", rank, "creating the process groups",
                         fmt::format("rank {} is outside the world of {} ranks", rank, world));

  im.guarded("creating the Gloo transport device", "", [&] {
    if (!options.interface.empty())
      im.device = c10d::ProcessGroupGloo::createDeviceForInterface(options.interface);
    else if (!options.hostname.empty())
      im.device = c10d::ProcessGroupGloo::createDeviceForHostname(options.hostname);
    else
      im.device = c10d::ProcessGroupGloo::createDefaultDevice();
  });

  // Fixed global creation order (see the header and allCommGroups()).
  for (const CommGroup kind : allCommGroups()) {
    Group g;
    g.members = layout.groupMembers(kind, rank);
    for (size_t i = 0; i < g.members.size(); ++i)
      if (g.members[i] == rank) g.group_rank = static_cast<int>(i);
    const bool needs_pg = g.members.size() > 1 || kind == CommGroup::kWorld;
    if (needs_pg) {
      const std::string prefix = fmt::format("{}/pg/{}/{}", options.prefix, toString(kind), g.members.front());
      im.guarded(fmt::format("creating the {} process group", toString(kind)),
                 fmt::format(" (members: ranks {}; {})", joinRanks(g.members), im.timeoutText()), [&] {
                   auto pg_options = c10d::ProcessGroupGloo::Options::create(options.timeout);
                   pg_options->devices.push_back(im.device);
                   pg_options->threads = 1;  // one operation at a time per group
                   auto prefixed = c10::make_intrusive<c10d::PrefixStore>(prefix, store);
                   g.pg = c10::make_intrusive<c10d::ProcessGroupGloo>(
                       prefixed, g.group_rank, static_cast<int>(g.members.size()), pg_options);
                 });
    }
    im.groups[kind] = std::move(g);
  }
}

C10dCommunicator::~C10dCommunicator() {
  if (!impl_) return;
  if (!impl_->failed) {
    try {
      flushSends();
    } catch (...) {
    }
  }
  if (impl_->failed) {
    // Deliberate leak (see the header): never wait on a dead peer while exiting.
    for (auto& [kind, g] : impl_->groups)
      if (g.pg) g.pg.release();
    for (auto& p : impl_->pending) {
      if (p.work) p.work.release();
      new at::Tensor(std::move(p.buffer));
    }
    new std::shared_ptr<::gloo::transport::Device>(std::move(impl_->device));
    (void)impl_.release();
  }
}

int C10dCommunicator::rank() const { return impl_->rank; }
int C10dCommunicator::size() const { return impl_->layout.world(); }
bool C10dCommunicator::failed() const { return impl_->failed; }
std::chrono::milliseconds C10dCommunicator::timeout() const { return impl_->options.timeout; }

void C10dCommunicator::allReduceSum(at::Tensor& tensor, CommGroup group) {
  Impl& im = *impl_;
  const Group& g = im.group(group);
  const int n = static_cast<int>(g.members.size());
  if (n == 1) return;
  const std::string op = fmt::format("allReduceSum({} group)", toString(group));
  const std::string context =
      fmt::format(" (group members: ranks {}; {})", joinRanks(g.members), im.timeoutText());
  im.guarded(op, context, [&] {
    if (!tensor.is_contiguous() || tensor.device().type() != at::kCPU)
      throw std::invalid_argument("the tensor must be a contiguous CPU tensor");
    if (tensor.scalar_type() == at::kDouble) {
      std::vector<at::Tensor> tensors{tensor};
      c10d::AllreduceOptions opts;  // reduceOp SUM by default
      opts.timeout = im.options.timeout;
      g.pg->allreduce(tensors, opts)->wait();
      return;
    }
    // Bytes all-gathered, then summed in group-rank order in the tensor's own dtype: exactly the
    // emulated backend's arithmetic.
    const int64_t nbytes = static_cast<int64_t>(tensor.numel() * tensor.element_size());
    std::vector<at::Tensor> input{at::from_blob(tensor.data_ptr(), {nbytes}, at::kByte)};
    std::vector<std::vector<at::Tensor>> output(1);
    for (int i = 0; i < n; ++i) output[0].push_back(at::empty({nbytes}, at::kByte));
    c10d::AllgatherOptions opts;
    opts.timeout = im.options.timeout;
    g.pg->allgather(output, input, opts)->wait();
    auto part = [&](int i) {
      return at::from_blob(output[0][i].data_ptr(), tensor.sizes(), tensor.options());
    };
    at::Tensor sum = part(0).clone();
    for (int i = 1; i < n; ++i) sum.add_(part(i));
    tensor.copy_(sum);
  });
}

void C10dCommunicator::send(const at::Tensor& tensor, int dst_rank, int tag) {
  Impl& im = *impl_;
  const std::string op = fmt::format("send(to {}, tag {})", dst_rank, tag);
  im.guarded(op, "", [&] {
    PendingSend p;
    p.buffer = tensor.detach().contiguous().clone();
    p.dst = dst_rank;
    p.tag = tag;
    std::vector<at::Tensor> tensors{p.buffer};
    p.work = im.group(CommGroup::kWorld).pg->send(tensors, dst_rank, tag);
    im.pending.push_back(std::move(p));
  });
}

void C10dCommunicator::recv(at::Tensor& tensor, int src_rank, int tag) {
  Impl& im = *impl_;
  const std::string op = fmt::format("recv(from {}, tag {})", src_rank, tag);
  im.guarded(op, fmt::format(" ({})", im.timeoutText()), [&] {
    at::Tensor buffer = tensor.is_contiguous() ? tensor.detach() : torch::empty_like(tensor);
    std::vector<at::Tensor> tensors{buffer};
    im.group(CommGroup::kWorld).pg->recv(tensors, src_rank, tag)->wait();
    if (!buffer.is_same(tensor)) {
      torch::NoGradGuard no_grad;
      tensor.copy_(buffer);
    }
  });
}

void C10dCommunicator::flushSends() {
  Impl& im = *impl_;
  while (!im.pending.empty()) {
    PendingSend& p = im.pending.front();
    im.guarded(fmt::format("send(to {}, tag {})", p.dst, p.tag),
               fmt::format(" (waiting for rank {} to receive it; {})", p.dst, im.timeoutText()),
               [&] { p.work->wait(); });
    im.pending.pop_front();
  }
}

void C10dCommunicator::barrier() {
  flushSends();
  Impl& im = *impl_;
  im.guarded("barrier(world)", fmt::format(" ({})", im.timeoutText()), [&] {
    c10d::BarrierOptions opts;
    opts.timeout = im.options.timeout;
    im.group(CommGroup::kWorld).pg->barrier(opts)->wait();
  });
}

#else  // !MOE_HAVE_GLOO

struct C10dCommunicator::Impl {};

C10dCommunicator::C10dCommunicator(const c10::intrusive_ptr<c10d::Store>&, int rank, const MeshLayout&,
                                   const C10dOptions&) {
  throw UsageError("backend 'gloo' is not available in this build (LibTorch without c10d Gloo); use "
                   "--backend emulated");
}
C10dCommunicator::~C10dCommunicator() = default;
int C10dCommunicator::rank() const { return 0; }
int C10dCommunicator::size() const { return 1; }
bool C10dCommunicator::failed() const { return true; }
std::chrono::milliseconds C10dCommunicator::timeout() const { return {}; }
void C10dCommunicator::allReduceSum(at::Tensor&, CommGroup) {}
void C10dCommunicator::send(const at::Tensor&, int, int) {}
void C10dCommunicator::recv(at::Tensor&, int, int) {}
void C10dCommunicator::flushSends() {}
void C10dCommunicator::barrier() {}

#endif  // MOE_HAVE_GLOO

}  // namespace moe
