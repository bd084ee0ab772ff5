#include "sim/control_channel.hpp"

#include <condition_variable>
#include <mutex>
#include <thread>

#include <fmt/format.h>

#include "common/errors.hpp"
#include "common/progress.hpp"

namespace moe {
namespace {

using Clock = std::chrono::steady_clock;

std::vector<uint8_t> bytesOf(const std::string& s) { return std::vector<uint8_t>(s.begin(), s.end()); }
std::string textOf(const std::vector<uint8_t>& b) { return std::string(b.begin(), b.end()); }

}  // namespace

struct ControlChannel::Impl {
  c10::intrusive_ptr<c10d::Store> store, heartbeat_store;
  int rank = 0;
  ControlChannelOptions options;
  int next_command = 0;
  std::thread heartbeat;
  std::mutex mutex;
  std::condition_variable cv;
  bool stop = false;

  std::string key(const std::string& name) const { return options.prefix + "/" + name; }
};

ControlChannel::ControlChannel(c10::intrusive_ptr<c10d::Store> store, c10::intrusive_ptr<c10d::Store> heartbeat_store,
                               int rank, ControlChannelOptions options)
    : impl_(std::make_unique<Impl>()) {
  impl_->store = std::move(store);
  impl_->heartbeat_store = std::move(heartbeat_store);
  impl_->rank = rank;
  impl_->options = std::move(options);
}

ControlChannel::~ControlChannel() { stopHeartbeat(); }

int ControlChannel::post(const std::string& command_json) {
  Impl& im = *impl_;
  const int index = im.next_command++;
  try {
    im.store->set(im.key(fmt::format("cmd/{}", index)), bytesOf(command_json));
  } catch (const std::exception& e) {
    throw RuntimeFailure(im.options.backend, im.rank, fmt::format("posting command {} to the other ranks", index),
                         im.options.store_description + ": " + withoutBacktrace(e.what()));
  }
  return index;
}

std::string ControlChannel::wait(int index, const std::string& op) {
  Impl& im = *impl_;
  const std::string cmd_key = im.key(fmt::format("cmd/{}", index));
  auto fail = [&](const std::string& what) { return RuntimeFailure(im.options.backend, im.rank, op, what); };
  int64_t last_beat = -1;
  auto last_beat_change = Clock::now();
  auto last_beat_check = Clock::now() - std::chrono::seconds(10);
  for (;;) {
    try {
      if (im.store->check({cmd_key})) {
        im.next_command = index + 1;
        return textOf(im.store->get(cmd_key));
      }
      const auto now = Clock::now();
      if (now - last_beat_check >= std::chrono::seconds(1)) {
        last_beat_check = now;
        const int64_t beat = im.store->add(im.key("heartbeat"), 0);
        if (beat != last_beat) {
          last_beat = beat;
          last_beat_change = now;
        } else if (now - last_beat_change > im.options.timeout) {
          throw fail(fmt::format("rank 0 has made no progress for {:.3g} s (no heartbeat, which it sends only "
                                 "while its work advances): it hangs outside a collective or was stopped",
                                 std::chrono::duration<double>(now - last_beat_change).count()));
        }
      }
    } catch (const Error&) {
      throw;
    } catch (const std::exception& e) {
      throw fail(fmt::format("lost {}; rank 0 has probably exited: {}", im.options.store_description,
                             withoutBacktrace(e.what())));
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
}

void ControlChannel::startHeartbeat() {
  Impl& im = *impl_;
  if (!im.heartbeat_store) return;
  const std::string beat_key = im.key("heartbeat");
  im.store->add(beat_key, 1);
  im.heartbeat = std::thread([&im, beat_key] {
    std::unique_lock<std::mutex> lock(im.mutex);
    std::uint64_t last_progress = progress::count();
    while (!im.stop) {
      lock.unlock();
      // A beat says "working", not "alive": it is sent only when this process advanced its progress
      // counter (reference tokens, schedule steps, completed collectives) since the last one, so a
      // rank 0 stuck outside any collective is seen as stuck however long its legitimate phases are.
      const std::uint64_t now = progress::count();
      try {
        if (now != last_progress) im.heartbeat_store->add(beat_key, 1);
      } catch (...) {
        return;
      }
      last_progress = now;
      lock.lock();
      im.cv.wait_for(lock, std::chrono::milliseconds(500), [&] { return im.stop; });
    }
  });
}

void ControlChannel::stopHeartbeat() {
  Impl& im = *impl_;
  {
    std::lock_guard<std::mutex> lock(im.mutex);
    im.stop = true;
  }
  im.cv.notify_all();
  if (im.heartbeat.joinable()) im.heartbeat.join();
}

}  // namespace moe
