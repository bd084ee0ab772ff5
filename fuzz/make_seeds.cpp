// Writes the generated part of the fuzz seed corpora (scripts/fuzz.sh --seeds runs it; the output is
// committed under fuzz/corpus/): safetensors files as the tool writes them (a problem dump, capture
// rank files in every float dtype) and capture-target inputs (capture_input.hpp) built from the
// base job and its dtype variants. The scenario seeds are the repository's scenario files, copied by
// the script. Usage: moe-fuzz-make-seeds CORPUS_DIR
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <string>
#include <vector>

#include "capture_input.hpp"
#include "data/problem.hpp"
#include "data/problem_io.hpp"
#include "data/safetensors.hpp"
#include "fuzz_support.hpp"
#include "scenario/scenario.hpp"

namespace fs = std::filesystem;

namespace {

void writeSeed(const fs::path& path, const std::vector<std::uint8_t>& bytes) {
  moe::fuzz::writeBytes(path, bytes.data(), bytes.size());
}

// One capture-target input: the mode byte, then the payload.
std::vector<std::uint8_t> captureInput(std::uint8_t mode, const std::vector<std::uint8_t>& payload) {
  std::vector<std::uint8_t> input{mode};
  input.insert(input.end(), payload.begin(), payload.end());
  return input;
}

// A capture of `ranks` written to a scratch folder; its rank files as seeds of both targets.
void captureSeeds(const fs::path& corpus, const std::string& tag, const std::vector<moe::CaptureRankRecord>& ranks) {
  const fs::path dir = moe::fuzz::scratchDirectory() / tag;
  moe::writeCapture(dir.string(), ranks);
  for (int r = 0; r < moe::fuzz::kCaptureRanks; ++r) {
    const std::vector<std::uint8_t> file = moe::fuzz::readBytes(dir / ("rank" + std::to_string(r) + ".safetensors"));
    const std::string rank_tag = tag + "-rank" + std::to_string(r);
    writeSeed(corpus / "safetensors" / ("seed-capture-" + rank_tag + ".safetensors"), file);
    const auto rank_bit = static_cast<std::uint8_t>(r == 1 ? moe::fuzz::kRankBit : 0);
    writeSeed(corpus / "capture" / ("seed-file-" + rank_tag), captureInput(rank_bit, file));
    const std::string manifest = moe::fuzz::splitRankFile(file).manifest;
    writeSeed(corpus / "capture" / ("seed-manifest-" + rank_tag),
              captureInput(rank_bit | moe::fuzz::kManifestBit, std::vector<std::uint8_t>(manifest.begin(), manifest.end())));
  }
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: %s CORPUS_DIR\n", argv[0]);
    return 2;
  }
  const fs::path corpus = argv[1];
  fs::create_directories(corpus / "safetensors");
  fs::create_directories(corpus / "capture");

  // A --dump of a small problem (x, y, valid, weights, both gradients).
  moe::Scenario scenario = moe::parseScenarioText(
      R"({"schema_version": 1, "name": "seed", "model": {"hidden": 3, "experts": 4, "top_k": 2, "layers": 2,
          "ffn": 2}, "data": {"batch": 2, "seq_len": 3}, "mesh": {"dp": 1, "pp": 1, "cp": 1,
          "microbatches": 1}})",
      "seed.json");
  const moe::ProblemData problem = moe::generateProblem(scenario);
  std::vector<std::vector<double>> grads(2, std::vector<double>(3 * 4, 0.25));
  moe::dumpProblemAndGradients((corpus / "safetensors" / "seed-dump.safetensors").string(), problem, grads, grads);
  moe::writeSafetensors((corpus / "safetensors" / "seed-empty.safetensors").string(), {}, {{"note", "no tensors"}});

  std::vector<moe::CaptureRankRecord> base = moe::fuzz::baseCaptureJob();
  captureSeeds(corpus, "base", base);
  for (const auto& [name, dtype] : {std::pair{"f64", moe::CaptureFloat::kF64}, std::pair{"bf16", moe::CaptureFloat::kBF16},
                                    std::pair{"f16", moe::CaptureFloat::kF16}}) {
    std::vector<moe::CaptureRankRecord> ranks = base;
    for (moe::CaptureRankRecord& rank : ranks) {
      rank.weight_dtype = rank.grad_dtype = rank.bias_dtype = rank.input_dtype = dtype;
      rank.valid_as_bool = true;
      rank.manifest.objective.compute_dtype = moe::DType::kFloat32;
      rank.manifest.objective.compute_dtype_given = true;
    }
    captureSeeds(corpus, name, ranks);
  }
  return 0;
}
