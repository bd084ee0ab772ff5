// What every fuzz target of moe-lbcheck shares: the one outcome contract of an input reader (a valid
// result or moe::InputError, the exception main() maps to exit 2; anything else is a bug the fuzzer
// must report as a crash), and a per-process scratch directory for readers that need files.
#pragma once

#include <stdlib.h>
#include <unistd.h>

#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <exception>
#include <filesystem>
#include <fstream>
#include <string>
#include <typeinfo>
#include <vector>

#include "common/errors.hpp"

namespace moe::fuzz {

// Stops the fuzzer with a report (libFuzzer saves the input as crash-*): `what` says which rule of
// the contract the input broke.
[[noreturn]] inline void contractBroken(const char* target, const std::string& what) {
  std::fprintf(stderr, "moe-lbcheck fuzz target %s: contract broken: %s\n", target, what.c_str());
  std::abort();
}

// Runs `read` on one input: returning normally or throwing moe::InputError (bad input, exit 2) is
// fine; any other exception is a bug and aborts, naming its type and message. An InputError must
// name where it happened (a file), as every message of the tool does.
template <typename Read>
void acceptOnlyInputErrors(const char* target, Read&& read) {
  try {
    read();
  } catch (const moe::InputError& e) {
    if (e.file().empty()) contractBroken(target, std::string("an InputError without a file: ") + e.what());
  } catch (const std::exception& e) {
    contractBroken(target, std::string("an exception other than InputError (") + typeid(e).name() +
                               "): " + e.what());
  } catch (...) {
    contractBroken(target, "a non-standard exception");
  }
}

// A fresh directory (mkdtemp under $TMPDIR or /tmp) for this process, removed at exit; several fuzz
// processes (-jobs, -workers) never share one.
inline const std::filesystem::path& scratchDirectory() {
  static const std::filesystem::path directory = [] {
    std::string pattern = (std::filesystem::temp_directory_path() / "moe-fuzz-XXXXXX").string();
    std::vector<char> buffer(pattern.begin(), pattern.end());
    buffer.push_back('\0');
    if (::mkdtemp(buffer.data()) == nullptr) {
      std::fprintf(stderr, "mkdtemp %s: %s\n", pattern.c_str(), std::strerror(errno));
      std::abort();
    }
    std::filesystem::path made(buffer.data());
    static const std::string to_remove = made.string();
    std::atexit([] {
      std::error_code ec;
      std::filesystem::remove_all(to_remove, ec);
    });
    return made;
  }();
  return directory;
}

// Replaces `path` with exactly `size` bytes.
inline void writeBytes(const std::filesystem::path& path, const std::uint8_t* data, std::size_t size) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(reinterpret_cast<const char*>(data), static_cast<std::streamsize>(size));
  out.close();
  if (!out) {
    std::fprintf(stderr, "cannot write %s\n", path.c_str());
    std::abort();
  }
}

inline std::vector<std::uint8_t> readBytes(const std::filesystem::path& path) {
  std::ifstream in(path, std::ios::binary);
  return std::vector<std::uint8_t>((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
}

}  // namespace moe::fuzz
