// What SIGINT, SIGTERM and SIGHUP do to moe-lbcheck: the process removes the temporary files and
// folders its writers registered (a report or capture being written, never a finished one), and
// exits with 128 + the signal (130 for SIGINT, 143 for SIGTERM, as shells report them). A finished
// output was renamed into place whole; an unfinished one is removed: an interrupted run leaves no
// partial output. The local launcher (sim/launcher.hpp) takes the signals over while it waits for
// its ranks, stops them, and then exits the same way. SIGPIPE is ignored: a write to a dead peer is
// an error its caller reports (exit 3 for a rank), not a silent death.
#pragma once

#include <string>

namespace moe::interrupt {

// Installs the handlers and starts the thread that does the cleanup (a signal handler may not
// allocate or take locks; the thread can). Call once in main() and again in a forked child, which
// inherits the handlers but not the thread. Idempotent per process. Unless `quiet`, the process says
// on stderr that it was interrupted (a rank of the local launcher is quiet: the launcher says it).
void exitOnSignal(bool quiet = false);

// While it lives, `path` (a file, or a folder removed with everything in it) is removed if the process
// is interrupted. release() (or destruction) ends the registration: call it once the path is renamed
// into its final place or removed.
class TemporaryPath {
 public:
  explicit TemporaryPath(std::string path);
  ~TemporaryPath();
  TemporaryPath(const TemporaryPath&) = delete;
  TemporaryPath& operator=(const TemporaryPath&) = delete;
  void release();

 private:
  std::string path_;
  bool registered_ = false;
};

}  // namespace moe::interrupt
