// Helpers shared by the tests that run the binary: a self-removing temporary directory and small
// file/string utilities.
#pragma once

#include <gtest/gtest.h>
#include <stdlib.h>
#include <sys/wait.h>

#include <cctype>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "../file_utils.hpp"

namespace moe::test {

namespace fs = std::filesystem;

inline bool contains(const std::string& haystack, const std::string& needle) {
  return haystack.find(needle) != std::string::npos;
}

// "moe-<suite>.<test>" of the running test (characters other than letters, digits, '-' and '.' as
// '_'), "moe-test" outside a test.
inline std::string currentTestTag() {
  const ::testing::TestInfo* info = ::testing::UnitTest::GetInstance()->current_test_info();
  if (info == nullptr) return "moe-test";
  std::string tag = std::string("moe-") + info->test_suite_name() + "." + info->name();
  for (char& c : tag)
    if (!std::isalnum(static_cast<unsigned char>(c)) && c != '-' && c != '.') c = '_';
  return tag;
}

// A fresh directory from mkdtemp (named after `tag`, by default the running test), removed with
// everything in it at destruction.
class TempDir {
 public:
  explicit TempDir(const std::string& tag = currentTestTag()) {
    std::string pattern = (fs::temp_directory_path() / (tag + "-XXXXXX")).string();
    std::vector<char> buf(pattern.begin(), pattern.end());
    buf.push_back('\0');
    if (::mkdtemp(buf.data()) == nullptr) {
      ADD_FAILURE() << "mkdtemp failed: " << std::strerror(errno);
      return;
    }
    path_ = buf.data();
  }
  ~TempDir() {
    std::error_code ec;
    if (!path_.empty()) fs::remove_all(path_, ec);
  }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  const fs::path& path() const { return path_; }
  fs::path operator/(const std::string& name) const { return path_ / name; }

 private:
  fs::path path_;
};

// Runs a shell command and returns its exit code and standard output (redirect in `command` to
// capture stderr instead).
struct ShellRun {
  int exit_code = -1;
  std::string output;
};

inline ShellRun runShell(const std::string& command) {
  ShellRun r;
  FILE* pipe = popen(command.c_str(), "r");
  if (pipe == nullptr) return r;
  char buf[4096];
  size_t n;
  while ((n = fread(buf, 1, sizeof buf, pipe)) > 0) r.output.append(buf, n);
  const int status = pclose(pipe);
  r.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  return r;
}

#ifdef MOE_CLI_PATH
// Runs the moe-lbcheck binary with `args` and returns its exit code and one of its streams (the other
// is discarded).
enum class CliStream { kStdout, kStderr };
inline ShellRun runCli(const std::string& args, CliStream keep) {
  return runShell(std::string(MOE_CLI_PATH) + " " + args +
                  (keep == CliStream::kStdout ? " 2>/dev/null" : " 2>&1 >/dev/null"));
}
#endif

}  // namespace moe::test
