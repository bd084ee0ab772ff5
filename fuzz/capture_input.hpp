// The input format of the capture fuzz target, shared with the seed generator (make_seeds.cpp).
//
// The target fuzzes one rank file of a small valid 2-rank capture (the base job below) while the
// other rank file stays valid. Byte 0 of an input chooses what the rest is:
//   bit 0: which rank file (rank0 or rank1.safetensors);
//   bit 1: 0 = the whole rank file's bytes; 1 = only its manifest text, spliced into the base rank
//          file's header as __metadata__["moe_lbcheck_capture"] (escaped as a JSON string, bytes >= 0x80
//          kept as they are), so that mutations reach the manifest reader without first breaking the
//          safetensors framing.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "../tests/capture_job.hpp"

namespace moe::fuzz {

using testjob::RankFileParts;
using testjob::rankFileWithManifest;
using testjob::splitRankFile;

constexpr int kCaptureRanks = 2;
constexpr std::uint8_t kRankBit = 1;
constexpr std::uint8_t kManifestBit = 2;

// The base job: dp 2, one layer, two microbatches, recorded top-k and expert bias.
inline std::vector<CaptureRankRecord> baseCaptureJob() {
  testjob::JobShape shape;
  shape.tp_size = 1;
  shape.layers = {0};
  shape.topk = true;
  shape.expert_bias = true;
  return testjob::buildJob(shape);
}

}  // namespace moe::fuzz
