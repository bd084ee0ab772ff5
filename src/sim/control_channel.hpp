// The control channel of a distributed run: how rank 0 tells the other ranks what to do next, and
// how they know it is still there. Commands are JSON texts under "<prefix>/cmd/<i>" in the session's
// c10d Store (posted by rank 0 in order, read by the others in order); that rank 0 is still working is
// a counter "<prefix>/heartbeat" that a thread of rank 0 bumps, every 0.5 s at most and only when
// rank 0's progress counter (common/progress.hpp) moved, over its own store connection (a c10d store
// client is not shared between threads). A waiting rank gives up when the counter stands still for
// the timeout: rank 0 exited, crashed, or hangs outside a collective.
#pragma once

#include <chrono>
#include <memory>
#include <string>

#include <torch/csrc/distributed/c10d/Store.hpp>

namespace moe {

struct ControlChannelOptions {
  std::string prefix = "moe-lbcheck";
  std::string backend = "gloo";          // named in every error
  std::chrono::milliseconds timeout{60000};
  std::string store_description;         // "the TCPStore at host:port (served by rank 0)", for errors
};

class ControlChannel {
 public:
  // `store` is this rank's main store connection; `heartbeat_store`, on rank 0 only, a second one for
  // the heartbeat thread (null on the other ranks).
  ControlChannel(c10::intrusive_ptr<c10d::Store> store, c10::intrusive_ptr<c10d::Store> heartbeat_store, int rank,
                 ControlChannelOptions options);
  ~ControlChannel();
  ControlChannel(const ControlChannel&) = delete;
  ControlChannel& operator=(const ControlChannel&) = delete;

  // Rank 0: the next command (index = the number posted before). Throws RuntimeFailure naming the
  // store on failure.
  int post(const std::string& command_json);
  // Other ranks: waits for command `index`; throws RuntimeFailure when rank 0's store is gone or it
  // made no progress for the timeout. `waiting_for` describes the wait in the error.
  std::string wait(int index, const std::string& waiting_for);
  // Rank 0: starts and stops the heartbeat thread.
  void startHeartbeat();
  void stopHeartbeat();

  struct Impl;

 private:
  std::unique_ptr<Impl> impl_;
};

}  // namespace moe
