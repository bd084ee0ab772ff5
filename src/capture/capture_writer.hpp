// Writing captures from plain vectors, torch-free: for tests, for `run --capture` and for generating
// fuzz corpora. The writer checks only what it needs to lay the bytes out (every vector's size against
// the shape it implies); it writes whatever values and manifest it is given, so that tests can write
// captures that break the contract on purpose.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "capture/capture.hpp"

namespace moe {

// The records of one microbatch of one layer on one rank (n rows).
struct CaptureMicrobatchRecord {
  int microbatch = 0;                  // m of layer{l}.mb{m}.*
  std::vector<double> input;           // [n, H] row-major
  std::vector<std::int64_t> sequence;  // [n]
  std::vector<std::int64_t> position;  // [n]
  std::vector<std::uint8_t> valid;     // [n]
  std::vector<std::int64_t> topk;      // [n, k], or empty: layer{l}.mb{m}.topk is not written
};

// One layer's records on one rank.
struct CaptureLayerRecord {
  int layer = 0;
  int experts = 0, hidden = 0;
  std::vector<double> weight;       // [E, H]
  std::vector<double> grad;         // [E, H]
  std::vector<double> expert_bias;  // [E], or empty: not written
  std::vector<CaptureMicrobatchRecord> microbatches;
};

// One rank file: its manifest (written as it is, `layers` included) and its tensors.
struct CaptureRankRecord {
  CaptureManifest manifest;
  std::vector<CaptureLayerRecord> layers;
  // Element types of the written tensors. Values are rounded to them to nearest, ties to even.
  CaptureFloat weight_dtype = CaptureFloat::kF32;
  CaptureFloat grad_dtype = CaptureFloat::kF32;
  CaptureFloat bias_dtype = CaptureFloat::kF32;
  CaptureFloat input_dtype = CaptureFloat::kF32;
  bool valid_as_bool = false;  // "BOOL" instead of "U8"
};

// Writes the rank file `path` atomically (safetensors, manifest under __metadata__). Throws
// std::invalid_argument when a vector's size does not match its shape (top-k: n * manifest top_k),
// moe::RuntimeFailure naming the path on I/O errors.
void writeCaptureRank(const std::string& path, const CaptureRankRecord& rank);

// Creates `directory` if needed and writes rank{manifest.rank}.safetensors for every record.
void writeCapture(const std::string& directory, const std::vector<CaptureRankRecord>& ranks);

}  // namespace moe
