// How the benchmarks measure a run's own peak RSS: the run happens in a forked child (which may
// re-execute this program, so that no page of the parent's heap counts), sends its results back as
// raw bytes through a pipe and exits; the parent takes the peak from wait4's ru_maxrss.
#pragma once

#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstddef>
#include <functional>

namespace moe::bench {

struct ChildOutcome {
  bool ok = false;         // the child exited 0 and sent all `bytes` bytes
  int status = 0;          // wait4's status
  double peak_bytes = 0;   // the child's peak RSS
};

// Forks; the child runs child(write_fd), which writes its result to write_fd (or execs a program that
// does) and returns the exit status the child then _exits with. The parent reads `bytes` bytes into
// `result` and waits for the child.
inline ChildOutcome runInChild(const std::function<int(int write_fd)>& child, void* result, std::size_t bytes) {
  ChildOutcome outcome;
  int fds[2];
  if (pipe(fds) != 0) return outcome;
  const pid_t pid = fork();
  if (pid < 0) return outcome;
  if (pid == 0) {
    close(fds[0]);
    _exit(child(fds[1]));
  }
  close(fds[1]);
  std::size_t got = 0;
  while (got < bytes) {
    const ssize_t n = read(fds[0], static_cast<char*>(result) + got, bytes - got);
    if (n <= 0) break;
    got += static_cast<std::size_t>(n);
  }
  close(fds[0]);
  struct rusage usage {};
  wait4(pid, &outcome.status, 0, &usage);
  outcome.peak_bytes = usage.ru_maxrss * 1024.0;
  outcome.ok = got == bytes && WIFEXITED(outcome.status) && WEXITSTATUS(outcome.status) == 0;
  return outcome;
}

}  // namespace moe::bench
