// Whole-file reads and writes for the tests, byte for byte (binary mode: no newline translation).
// Torch-free and gtest-free, so the base tests, the bad-input table and the binary-running tests
// share one copy.
#pragma once

#include <filesystem>
#include <fstream>
#include <sstream>
#include <stdexcept>
#include <string>

namespace moe::test {

// The file's bytes; empty when it cannot be read.
inline std::string readText(const std::filesystem::path& path) {
  std::ifstream in(path, std::ios::binary);
  std::ostringstream s;
  s << in.rdbuf();
  return s.str();
}

// Replaces the file's contents; throws std::runtime_error naming the path when it cannot be written.
inline void writeText(const std::filesystem::path& path, const std::string& bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out << bytes;
  if (!out) throw std::runtime_error("cannot write " + path.string());
}

}  // namespace moe::test
