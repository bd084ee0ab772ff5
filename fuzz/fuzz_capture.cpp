// Fuzz target: the capture loader (loadCapture on a directory of rank files), in the input format of
// capture_input.hpp: one rank file's bytes, or its manifest text, with the other rank file valid. A
// loaded capture or an InputError naming the file; nothing else.
#include <cstdint>
#include <string>
#include <vector>

#include "capture/capture.hpp"
#include "capture_input.hpp"
#include "fuzz_support.hpp"

namespace {

struct BaseCapture {
  std::string directory;
  std::vector<std::vector<std::uint8_t>> files;  // per rank
  std::vector<moe::fuzz::RankFileParts> parts;   // per rank
};

const BaseCapture& baseCapture() {
  static const BaseCapture base = [] {
    BaseCapture b;
    b.directory = (moe::fuzz::scratchDirectory() / "capture").string();
    moe::writeCapture(b.directory, moe::fuzz::baseCaptureJob());
    for (int r = 0; r < moe::fuzz::kCaptureRanks; ++r) {
      b.files.push_back(moe::fuzz::readBytes(b.directory + "/rank" + std::to_string(r) + ".safetensors"));
      b.parts.push_back(moe::fuzz::splitRankFile(b.files.back()));
    }
    (void)moe::loadCapture(b.directory);  // the base itself must be valid
    return b;
  }();
  return base;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  if (size == 0) return 0;
  const BaseCapture& base = baseCapture();
  const int rank = (data[0] & moe::fuzz::kRankBit) ? 1 : 0;
  const std::string path = base.directory + "/rank" + std::to_string(rank) + ".safetensors";
  if (data[0] & moe::fuzz::kManifestBit) {
    const std::string manifest(reinterpret_cast<const char*>(data + 1), size - 1);
    const std::vector<std::uint8_t> file = moe::fuzz::rankFileWithManifest(base.parts[rank], manifest);
    moe::fuzz::writeBytes(path, file.data(), file.size());
  } else {
    moe::fuzz::writeBytes(path, data + 1, size - 1);
  }
  moe::fuzz::acceptOnlyInputErrors("capture", [&] { (void)moe::loadCapture(base.directory); });
  const std::vector<std::uint8_t>& original = base.files[rank];
  moe::fuzz::writeBytes(path, original.data(), original.size());
  return 0;
}
