#include "capture/capture_writer.hpp"

#include <filesystem>
#include <stdexcept>

#include "capture/capture_manifest.hpp"
#include "capture/float_formats.hpp"
#include "common/errors.hpp"
#include "data/safetensors.hpp"

namespace moe {
namespace {

void requireSize(const std::string& name, std::size_t size, std::int64_t expected) {
  if (static_cast<std::int64_t>(size) != expected) {
    throw std::invalid_argument("capture writer: tensor \"" + name + "\" has " + std::to_string(size) +
                                " values, its shape needs " + std::to_string(expected));
  }
}

NamedTensor floatTensor(const std::string& name, std::vector<std::int64_t> shape,
                        const std::vector<double>& values, CaptureFloat dtype) {
  requireSize(name, values.size(), elementCount(shape));
  NamedTensor tensor{name, toString(dtype), std::move(shape), {}};
  appendEncoded(tensor.bytes, values.data(), values.size(), dtype);
  return tensor;
}

NamedTensor int64Tensor(const std::string& name, std::vector<std::int64_t> shape,
                        const std::vector<std::int64_t>& values) {
  requireSize(name, values.size(), elementCount(shape));
  NamedTensor tensor{name, "I64", std::move(shape), {}};
  tensor.bytes.reserve(values.size() * 8);
  for (std::int64_t v : values)
    for (int b = 0; b < 8; ++b)
      tensor.bytes.push_back(static_cast<std::uint8_t>(static_cast<std::uint64_t>(v) >> (8 * b)));
  return tensor;
}

}  // namespace

void writeCaptureRank(const std::string& path, const CaptureRankRecord& rank) {
  std::vector<NamedTensor> tensors;
  const int k = rank.manifest.objective.top_k;
  for (const CaptureLayerRecord& layer : rank.layers) {
    const std::string prefix = "layer" + std::to_string(layer.layer) + ".";
    const std::vector<std::int64_t> weight_shape = {layer.experts, layer.hidden};
    tensors.push_back(floatTensor(prefix + "weight", weight_shape, layer.weight, rank.weight_dtype));
    tensors.push_back(floatTensor(prefix + "weight.grad", weight_shape, layer.grad, rank.grad_dtype));
    if (!layer.expert_bias.empty()) {
      tensors.push_back(
          floatTensor(prefix + "expert_bias", {layer.experts}, layer.expert_bias, rank.bias_dtype));
    }
    for (const CaptureMicrobatchRecord& mb : layer.microbatches) {
      const std::string mb_prefix = prefix + "mb" + std::to_string(mb.microbatch) + ".";
      const auto n = static_cast<std::int64_t>(mb.sequence.size());
      tensors.push_back(floatTensor(mb_prefix + "input", {n, layer.hidden}, mb.input, rank.input_dtype));
      tensors.push_back(int64Tensor(mb_prefix + "sequence", {n}, mb.sequence));
      tensors.push_back(int64Tensor(mb_prefix + "position", {n}, mb.position));
      requireSize(mb_prefix + "valid", mb.valid.size(), n);
      tensors.push_back(NamedTensor{mb_prefix + "valid", rank.valid_as_bool ? "BOOL" : "U8", {n}, mb.valid});
      if (!mb.topk.empty()) tensors.push_back(int64Tensor(mb_prefix + "topk", {n, k}, mb.topk));
    }
  }
  writeSafetensors(path, tensors, {{kCaptureManifestKey, captureManifestToJson(rank.manifest)}});
}

void writeCapture(const std::string& directory, const std::vector<CaptureRankRecord>& ranks) {
  std::error_code ec;
  std::filesystem::create_directories(directory, ec);
  if (ec) throw RuntimeFailure("capture writer: cannot create " + directory + ": " + ec.message());
  for (const CaptureRankRecord& rank : ranks) {
    writeCaptureRank(
        (std::filesystem::path(directory) / ("rank" + std::to_string(rank.manifest.rank) + ".safetensors"))
            .string(),
        rank);
  }
}

}  // namespace moe
