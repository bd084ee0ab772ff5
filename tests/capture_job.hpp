// A small capture job built from formulas (every value known in closed form), and edits of a rank
// file's manifest text at the byte level; shared by the capture tests, the bad-input tables and the
// fuzz target and seeds (fuzz/).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "capture/capture.hpp"
#include "capture/capture_manifest.hpp"
#include "capture/capture_writer.hpp"

namespace moe::testjob {


// A small job: rank = ((pp * dp_size + dp) * cp_size + cp) * tp_size + tp. DP replica d, microbatch
// m holds sequence d * microbatches + m, all seq_len positions; CP rank c holds the positions
// p with p % cp_size == c; TP ranks hold the same rows; PP stage s holds an equal share of layers.
struct JobShape {
  int dp_size = 2, cp_size = 1, pp_size = 1, tp_size = 2;
  int microbatches = 2;
  std::vector<int> layers = {0, 1};
  int experts = 4, hidden = 3, top_k = 2, seq_len = 4;
  bool topk = false, expert_bias = false;
  int world() const { return dp_size * cp_size * pp_size * tp_size; }
};

// Values exactly representable in F16, BF16 and F32 (multiples of 1/8, 1/4, 1/16 in [-2, 2]), so
// that every dtype reads them back unchanged.
inline double inputFor(int layer, std::int64_t sequence, std::int64_t position, int column) {
  return static_cast<double>((layer * 7 + sequence * 5 + position * 3 + column) % 17 - 8) / 8.0;
}
inline double weightFor(int layer, int expert, int h) {
  return static_cast<double>((layer * 3 + expert * 5 + h) % 11 - 5) / 4.0;
}
inline double gradFor(int rank, int layer, int expert, int h) {
  return static_cast<double>((rank * 13 + layer * 7 + expert * 3 + h) % 9 - 4) / 16.0;
}
inline double biasFor(int layer, int expert) { return (expert - 1) * 0.5 + layer; }
inline std::int64_t topkFor(std::int64_t sequence, std::int64_t position, int j, int experts) {
  return (sequence + position + j) % experts;
}
// The one padding token: the last position of the last sequence.
inline bool validFor(const JobShape& job, std::int64_t sequence, std::int64_t position) {
  return !(sequence == job.dp_size * job.microbatches - 1 && position == job.seq_len - 1);
}

inline std::vector<CaptureRankRecord> buildJob(const JobShape& job) {
  std::vector<CaptureRankRecord> ranks;
  const int layers_per_stage = static_cast<int>(job.layers.size()) / job.pp_size;
  for (int pp = 0; pp < job.pp_size; ++pp)
    for (int dp = 0; dp < job.dp_size; ++dp)
      for (int cp = 0; cp < job.cp_size; ++cp)
        for (int tp = 0; tp < job.tp_size; ++tp) {
          CaptureRankRecord rank;
          CaptureManifest& m = rank.manifest;
          m.rank = static_cast<int>(ranks.size());
          m.world_size = job.world();
          m.mesh = CaptureMesh{dp,          job.dp_size, cp, job.cp_size,     pp, job.pp_size, tp,
                               job.tp_size, 0,           1,  job.microbatches};
          m.layers.assign(job.layers.begin() + pp * layers_per_stage,
                          job.layers.begin() + (pp + 1) * layers_per_stage);
          m.seq_len = job.seq_len;
          m.objective.aux_scope = AuxScope::kMicroBatch;
          m.objective.aux_coeff = 0.01;
          m.objective.top_k = job.top_k;
          m.objective.score = ScoreFunction::kSoftmax;
          m.framework = "unit test";
          m.created_by = "tests/base/test_capture.cpp";
          for (int l : m.layers) {
            CaptureLayerRecord layer;
            layer.layer = l;
            layer.experts = job.experts;
            layer.hidden = job.hidden;
            for (int e = 0; e < job.experts; ++e)
              for (int h = 0; h < job.hidden; ++h) {
                layer.weight.push_back(weightFor(l, e, h));
                layer.grad.push_back(gradFor(m.rank, l, e, h));
              }
            if (job.expert_bias)
              for (int e = 0; e < job.experts; ++e) layer.expert_bias.push_back(biasFor(l, e));
            for (int mb = 0; mb < job.microbatches; ++mb) {
              CaptureMicrobatchRecord record;
              record.microbatch = mb;
              const std::int64_t sequence = dp * job.microbatches + mb;
              // Rows in reverse position order: a rank may flatten its rows in any order.
              for (std::int64_t p = job.seq_len - 1; p >= 0; --p) {
                if (p % job.cp_size != cp) continue;
                record.sequence.push_back(sequence);
                record.position.push_back(p);
                record.valid.push_back(validFor(job, sequence, p) ? 1 : 0);
                for (int c = 0; c < job.hidden; ++c) record.input.push_back(inputFor(l, sequence, p, c));
                if (job.topk)
                  for (int j = 0; j < job.top_k; ++j)
                    record.topk.push_back(topkFor(sequence, p, j, job.experts));
              }
              layer.microbatches.push_back(std::move(record));
            }
            rank.layers.push_back(std::move(layer));
          }
          ranks.push_back(std::move(rank));
        }
  return ranks;
}

// ---- a rank file's manifest, edited as text (for input no JSON library would write)

// A rank file's bytes split at its header: the header JSON without __metadata__ (its entries, no
// braces) and the data buffer.
struct RankFileParts {
  std::string tensor_entries;
  std::string data;
  std::string manifest;  // the original manifest text
};

inline RankFileParts splitRankFile(const std::vector<std::uint8_t>& bytes) {
  std::uint64_t header_length = 0;
  for (int i = 7; i >= 0; --i) header_length = (header_length << 8) | bytes.at(static_cast<std::size_t>(i));
  const std::string header(bytes.begin() + 8, bytes.begin() + 8 + static_cast<std::ptrdiff_t>(header_length));
  nlohmann::json parsed = nlohmann::json::parse(header);
  RankFileParts parts;
  parts.manifest = parsed.at("__metadata__").at(kCaptureManifestKey).get<std::string>();
  parsed.erase("__metadata__");
  const std::string entries = parsed.dump();
  parts.tensor_entries = entries.substr(1, entries.size() - 2);
  parts.data.assign(bytes.begin() + 8 + static_cast<std::ptrdiff_t>(header_length), bytes.end());
  return parts;
}

// `text` as the body of a JSON string: quote, backslash and control characters escaped, every other
// byte (invalid UTF-8 included) kept.
inline std::string escapeJsonStringBytes(const std::string& text) {
  std::string out;
  for (const char c : text) {
    const auto byte = static_cast<unsigned char>(c);
    if (c == '"' || c == '\\') {
      out += '\\';
      out += c;
    } else if (byte < 0x20) {
      static const char* hex = "0123456789abcdef";
      out += "\\u00";
      out += hex[byte >> 4];
      out += hex[byte & 15];
    } else {
      out += c;
    }
  }
  return out;
}

// The rank file with `manifest_text` as its manifest and the base file's tensors and data.
inline std::vector<std::uint8_t> rankFileWithManifest(const RankFileParts& parts, const std::string& manifest_text) {
  std::string header = "{\"__metadata__\":{\"" + std::string(kCaptureManifestKey) + "\":\"" +
                       escapeJsonStringBytes(manifest_text) + "\"}";
  if (!parts.tensor_entries.empty()) header += "," + parts.tensor_entries;
  header += "}";
  while (header.size() % 8 != 0) header += ' ';
  std::vector<std::uint8_t> bytes(8);
  std::uint64_t length = header.size();
  for (int i = 0; i < 8; ++i) bytes[static_cast<std::size_t>(i)] = static_cast<std::uint8_t>(length >> (8 * i));
  bytes.insert(bytes.end(), header.begin(), header.end());
  bytes.insert(bytes.end(), parts.data.begin(), parts.data.end());
  return bytes;
}

}  // namespace moe::testjob
