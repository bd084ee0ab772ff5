#include "common/interrupt.hpp"

#include <fcntl.h>
#include <signal.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <filesystem>
#include <mutex>
#include <set>
#include <string>
#include <thread>

namespace moe::interrupt {
namespace {

// The registry of temporary paths, and the pipe through which the handler wakes the cleanup thread.
std::mutex& registryMutex() {
  static std::mutex m;
  return m;
}
std::multiset<std::string>& registry() {
  static std::multiset<std::string> paths;
  return paths;
}

int g_pipe_write = -1;      // written by the handler (write(2) is async-signal-safe)
bool g_quiet = false;       // a rank of the local launcher: the launcher reports the interrupt
pid_t g_installed_pid = 0;  // the process whose thread reads the pipe

extern "C" void onSignal(int sig) {
  const unsigned char byte = static_cast<unsigned char>(sig);
  const int saved = errno;
  if (g_pipe_write < 0 || ::write(g_pipe_write, &byte, 1) != 1) _exit(128 + sig);
  errno = saved;
}

void cleanupThread(int read_fd) {
  unsigned char sig = 0;
  for (;;) {
    const ssize_t n = ::read(read_fd, &sig, 1);
    if (n == 1) break;
    if (n < 0 && errno == EINTR) continue;
    return;  // the pipe is gone: nothing to wait for
  }
  {
    std::lock_guard<std::mutex> lock(registryMutex());  // no writer registers or releases meanwhile
    std::error_code ec;
    for (const std::string& path : registry()) std::filesystem::remove_all(path, ec);
  }
  if (!g_quiet) {
    const std::string line = "moe-lbcheck: interrupted by signal " + std::to_string(sig) + " (" +
                             strsignal(sig) + "); unfinished outputs removed, nothing was written\n";
    if (::write(STDERR_FILENO, line.data(), line.size()) < 0) {
    }
  }
  _exit(128 + sig);  // no destructor may run: other threads are still working
}

}  // namespace

void exitOnSignal(bool quiet) {
  if (g_installed_pid == ::getpid()) return;
  g_quiet = quiet;
  int fds[2];
  if (::pipe2(fds, O_CLOEXEC) != 0) return;  // without the pipe, the default actions stay
  if (g_pipe_write >= 0) ::close(g_pipe_write);  // a forked child's copy of its parent's pipe
  g_pipe_write = fds[1];
  g_installed_pid = ::getpid();
  std::thread(cleanupThread, fds[0]).detach();
  struct sigaction action {};
  action.sa_handler = onSignal;
  sigemptyset(&action.sa_mask);
  for (int sig : {SIGINT, SIGTERM, SIGHUP}) sigaction(sig, &action, nullptr);
  // A write to a socket or pipe whose reader died (a killed peer rank, a closed control channel)
  // must fail with EPIPE, which the writer reports naming the operation and exits 3 like every
  // other survivor; the default action would end the process silently with signal 13.
  ::signal(SIGPIPE, SIG_IGN);
}

TemporaryPath::TemporaryPath(std::string path) : path_(std::move(path)) {
  std::lock_guard<std::mutex> lock(registryMutex());
  registry().insert(path_);
  registered_ = true;
}

TemporaryPath::~TemporaryPath() { release(); }

void TemporaryPath::release() {
  if (!registered_) return;
  std::lock_guard<std::mutex> lock(registryMutex());
  const auto it = registry().find(path_);
  if (it != registry().end()) registry().erase(it);
  registered_ = false;
}

}  // namespace moe::interrupt
