#include "sim/emulated_communicator.hpp"

#include <deque>
#include <thread>
#include <tuple>

#include <fmt/format.h>

#include "common/errors.hpp"
#include "common/progress.hpp"

namespace moe {

namespace {

// One all-reduce rendezvous per concrete group (identified by its kind and first member). Each
// rendezvous and each mailbox has its own condition variable: a completed all-reduce or a delivered
// message wakes only the ranks waiting on it. (One shared condition variable woke every waiting rank
// on every event: with 4096 ranks, most of them waiting at any time, that was O(world^2) wake-ups and
// five times the single-device run's time, nearly all of it in the kernel.)
struct ReduceSlot {
  std::condition_variable changed;  // an arrival completed the round, or its result was read by all
  std::uint64_t generation = 0;
  int arrived = 0;
  int readers_left = 0;
  std::vector<const at::Tensor*> contributions;
  at::Tensor result;
};

// The messages sent from one rank to another with one tag, in the order they were sent.
struct Mailbox {
  std::condition_variable delivered;
  std::deque<at::Tensor> messages;
};

}  // namespace

struct EmulatedWorld::Impl {
  std::mutex mutex;  // guards everything below (std::map nodes stay put: waiters hold references)
  std::map<std::pair<int, int>, ReduceSlot> slots;         // (group kind, first member)
  std::map<std::tuple<int, int, int>, Mailbox> mailboxes;  // (src, dst, tag)
  bool aborted = false;
  std::string abort_reason;

  // Wakes every waiting rank (after an abort). Every wait is on a slot or mailbox of these maps,
  // created under `mutex` before the wait.
  void wakeAll() {
    for (auto& entry : slots) entry.second.changed.notify_all();
    for (auto& entry : mailboxes) entry.second.delivered.notify_all();
  }
};

EmulatedWorld::EmulatedWorld(const MeshLayout& layout, EmulatedOptions options)
    : layout_(layout), options_(options), impl_(std::make_unique<Impl>()) {
  const unsigned cores = std::thread::hardware_concurrency();
  free_slots_ = options.compute_slots > 0 ? options.compute_slots : static_cast<int>(cores == 0 ? 1 : cores);
}
EmulatedWorld::~EmulatedWorld() = default;

void EmulatedWorld::acquireComputeSlot() {
  std::unique_lock<std::mutex> lock(slot_mutex_);
  slot_freed_.wait(lock, [&] { return free_slots_ > 0; });
  --free_slots_;
}

void EmulatedWorld::releaseComputeSlot() {
  {
    std::lock_guard<std::mutex> lock(slot_mutex_);
    ++free_slots_;
  }
  slot_freed_.notify_one();
}

namespace {

// Gives the rank's compute slot up for the duration of a blocking communication call and takes it
// back afterwards (after the communicator's own lock is released: no lock is held while waiting
// for a slot).
class SlotReleasedWhileWaiting {
 public:
  explicit SlotReleasedWhileWaiting(EmulatedWorld& world) : world_(world) { world_.releaseComputeSlot(); }
  ~SlotReleasedWhileWaiting() { world_.acquireComputeSlot(); }

 private:
  EmulatedWorld& world_;
};

}  // namespace

void EmulatedWorld::abort(const std::string& why) {
  std::lock_guard<std::mutex> lock(impl_->mutex);
  if (!impl_->aborted) {
    impl_->aborted = true;
    impl_->abort_reason = why;
  }
  impl_->wakeAll();
}

namespace {

// Waits on `cv` (guarded by impl.mutex, held in `lock`) until `ready()` or the world aborts or no rank has progressed
// for `timeout`; throws on the latter two. A wait is not a hang while other ranks work: with thousands of ranks sharing
// a few compute slots, a peer may legitimately start its step minutes after this rank began waiting, so the deadline
// moves on whenever the process's progress counter (common/progress.hpp, advanced by every rank's schedule steps) has
// moved.
template <class Ready>
void waitOrThrow(std::unique_lock<std::mutex>& lock, std::condition_variable& cv, EmulatedWorld::Impl& impl,
                 std::chrono::milliseconds timeout, int rank, const std::string& op, Ready ready) {
  auto deadline = std::chrono::steady_clock::now() + timeout;
  std::uint64_t progress_seen = progress::count();
  while (!ready()) {
    if (impl.aborted) throw RuntimeFailure("emulated", rank, op, "aborted: " + impl.abort_reason);
    if (cv.wait_until(lock, deadline) == std::cv_status::timeout && !ready()) {
      const std::uint64_t progress_now = progress::count();
      if (progress_now != progress_seen) {
        progress_seen = progress_now;
        deadline = std::chrono::steady_clock::now() + timeout;
        continue;
      }
      throw RuntimeFailure("emulated", rank, op,
                           fmt::format("timed out after {:.1f} s waiting for its peers (no rank progressed)",
                                       timeout.count() / 1000.0));
    }
  }
  if (impl.aborted) throw RuntimeFailure("emulated", rank, op, "aborted: " + impl.abort_reason);
}

}  // namespace

void EmulatedCommunicator::allReduceSum(at::Tensor& tensor, CommGroup group) {
  auto& impl = *world_.impl_;
  const std::vector<int> members = world_.layout().groupMembers(group, rank_);
  const int n = static_cast<int>(members.size());
  if (n == 1) return;
  int index = 0;
  while (members[index] != rank_) ++index;
  const std::string op = fmt::format("allReduceSum({} group)", toString(group));

  SlotReleasedWhileWaiting released(world_);
  std::unique_lock<std::mutex> lock(impl.mutex);
  ReduceSlot& slot = impl.slots[{static_cast<int>(group), members.front()}];
  // The previous round of this group must have been read by every member before the slot is reused.
  waitOrThrow(lock, slot.changed, impl, world_.options_.timeout, rank_, op, [&] { return slot.readers_left == 0; });
  if (slot.contributions.empty()) slot.contributions.assign(n, nullptr);
  slot.contributions[index] = &tensor;
  const std::uint64_t my_generation = slot.generation;
  if (++slot.arrived == n) {
    // Real arithmetic, summed in group-rank order: deterministic whatever the thread timing.
    at::Tensor sum = slot.contributions[0]->clone();
    for (int i = 1; i < n; ++i) sum.add_(*slot.contributions[i]);
    slot.result = sum;
    slot.arrived = 0;
    slot.readers_left = n;
    slot.contributions.assign(n, nullptr);
    ++slot.generation;
    slot.changed.notify_all();
  } else {
    waitOrThrow(lock, slot.changed, impl, world_.options_.timeout, rank_, op,
                [&] { return slot.generation != my_generation; });
  }
  tensor.copy_(slot.result);
  if (--slot.readers_left == 0) {
    slot.result = at::Tensor();
    slot.changed.notify_all();
  }
}

void EmulatedCommunicator::send(const at::Tensor& tensor, int dst_rank, int tag) {
  auto& impl = *world_.impl_;
  at::Tensor copy = tensor.detach().clone();
  std::lock_guard<std::mutex> lock(impl.mutex);
  if (impl.aborted)
    throw RuntimeFailure("emulated", rank_, fmt::format("send(to {})", dst_rank),
                         "aborted: " + impl.abort_reason);
  Mailbox& box = impl.mailboxes[{rank_, dst_rank, tag}];
  box.messages.push_back(std::move(copy));
  box.delivered.notify_all();
}

void EmulatedCommunicator::recv(at::Tensor& tensor, int src_rank, int tag) {
  auto& impl = *world_.impl_;
  SlotReleasedWhileWaiting released(world_);
  std::unique_lock<std::mutex> lock(impl.mutex);
  Mailbox& box = impl.mailboxes[{src_rank, rank_, tag}];
  waitOrThrow(lock, box.delivered, impl, world_.options_.timeout, rank_,
              fmt::format("recv(from {}, tag {})", src_rank, tag), [&] { return !box.messages.empty(); });
  at::Tensor got = std::move(box.messages.front());
  box.messages.pop_front();
  lock.unlock();
  if (!got.sizes().equals(tensor.sizes()))
    throw RuntimeFailure("emulated", rank_, fmt::format("recv(from {}, tag {})", src_rank, tag),
                         "message has a different shape than the receive buffer");
  tensor.copy_(got);
}

void EmulatedCommunicator::barrier() {
  at::Tensor token = at::zeros({1}, at::kDouble);
  allReduceSum(token, CommGroup::kWorld);
}

}  // namespace moe
