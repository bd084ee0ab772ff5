// Exceptions of moe-lbcheck. Every error carries the context a user needs to act on it (file, JSON
// path, rank, operation). They are thrown anywhere and caught only in main() (and, for a rank of a
// distributed run, in the function that ends that rank), which maps them to the exit codes below.
#pragma once

#include <stdexcept>
#include <string>

namespace moe {

// The exit codes of every subcommand (README "Exit codes").
enum class ExitCode : int {
  kOk = 0,              // every check met its expectation
  kCheckFailed = 1,     // a gradient check failed (or the outcome did not match `expect`)
  kInvalidInput = 2,    // invalid usage or input
  kRuntimeFailure = 3,  // a rank died, a timeout, a collective failed
};

// An exception's message without the C++ backtrace LibTorch's c10::Error appends to what()
// ("\nException raised from ...") and without trailing whitespace.
inline std::string withoutBacktrace(std::string message) {
  const auto backtrace = message.find("\nException raised from");
  if (backtrace != std::string::npos) message.resize(backtrace);
  while (!message.empty() && (message.back() == '\n' || message.back() == ' ')) message.pop_back();
  return message;
}

// Base class: a message plus the exit code main() must return for it.
class Error : public std::runtime_error {
 public:
  Error(ExitCode code, const std::string& message) : std::runtime_error(message), code_(code) {}
  ExitCode code() const { return code_; }

 private:
  ExitCode code_;
};

// Bad input: names the file, the JSON path (e.g. "/mesh/dp") and what was expected. Exit code 2.
class InputError : public Error {
 public:
  InputError(const std::string& file, const std::string& json_path, const std::string& expected)
      : Error(ExitCode::kInvalidInput, format(file, json_path, expected)),
        file_(file), json_path_(json_path) {}
  const std::string& file() const { return file_; }
  const std::string& jsonPath() const { return json_path_; }

 private:
  static std::string format(const std::string& file, const std::string& path, const std::string& what) {
    std::string where = file.empty() ? std::string("<input>") : file;
    if (!path.empty()) where += ": " + path;
    return where + ": " + what;
  }
  std::string file_;
  std::string json_path_;
};

// Bad command-line usage (unknown flag value, conflicting options). Exit code 2.
class UsageError : public Error {
 public:
  explicit UsageError(const std::string& message) : Error(ExitCode::kInvalidInput, message) {}
};

// A failure while running: names the backend, the rank and the operation. Exit code 3.
class RuntimeFailure : public Error {
 public:
  RuntimeFailure(const std::string& backend, int rank, const std::string& operation,
                 const std::string& what)
      : Error(ExitCode::kRuntimeFailure, format(backend, rank, operation, what)) {}
  explicit RuntimeFailure(const std::string& what) : Error(ExitCode::kRuntimeFailure, what) {}

 private:
  static std::string format(const std::string& backend, int rank, const std::string& op,
                            const std::string& what) {
    std::string s = backend;
    if (rank >= 0) s += " rank " + std::to_string(rank);
    if (!op.empty()) s += " " + op;
    return s + ": " + what;
  }
};

}  // namespace moe
