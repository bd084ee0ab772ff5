#include "data/problem_io.hpp"

#include <cmath>
#include <filesystem>
#include <stdexcept>
#include <unordered_map>

#include "common/errors.hpp"
#include "data/safetensors.hpp"

namespace moe {
namespace {

std::string layerTensorName(int layer, const char* what) {
  return "layer" + std::to_string(layer) + "." + what;
}

// Looks tensors up by name and checks them against the sizes the scenario declares. Errors point at
// the scenario's /data/safetensors entry and name the safetensors file.
class ProblemTensorReader {
 public:
  ProblemTensorReader(const Scenario& scenario, std::string data_path)
      : scenario_file_(scenario.source_file), data_path_(std::move(data_path)) {
    for (NamedTensor& t : readSafetensors(data_path_)) by_name_.emplace(t.name, std::move(t));
  }

  bool contains(const std::string& name) const { return by_name_.count(name) != 0; }

  // The tensor `name` with exactly `expected` shape; `meaning` says which scenario sizes it follows.
  const NamedTensor& require(const std::string& name, const std::vector<std::int64_t>& expected,
                             const std::string& meaning) const {
    const auto it = by_name_.find(name);
    if (it == by_name_.end()) {
      throw mismatch("a tensor " + name + " of shape " + shapeToString(expected) + " (" + meaning +
                     ") in " + data_path_ + "; it is missing");
    }
    if (it->second.shape != expected) {
      throw mismatch("tensor " + name + " has shape " + shapeToString(it->second.shape) + ", expected " +
                     shapeToString(expected) + " (" + meaning + ") in " + data_path_);
    }
    return it->second;
  }

  std::vector<double> floats(const std::string& name, const std::vector<std::int64_t>& expected,
                             const std::string& meaning) const {
    std::vector<double> values = tensorAsF64(require(name, expected, meaning), data_path_);
    for (std::size_t i = 0; i < values.size(); ++i) {
      if (!std::isfinite(values[i])) {
        throw InputError(data_path_, "/" + name,
                         "finite values, element " + std::to_string(i) + " is " + std::to_string(values[i]));
      }
    }
    return values;
  }

  std::vector<std::uint8_t> mask(const std::string& name, const std::vector<std::int64_t>& expected,
                                 const std::string& meaning) const {
    const NamedTensor& t = require(name, expected, meaning);
    if (t.dtype != "U8" && t.dtype != "BOOL") {
      throw InputError(data_path_, "/" + name, "dtype U8 or BOOL (1 = real token, 0 = padding), got " + t.dtype);
    }
    for (std::size_t i = 0; i < t.bytes.size(); ++i) {
      if (t.bytes[i] > 1) {
        throw InputError(data_path_, "/" + name, "values 0 or 1, element " + std::to_string(i) + " is " +
                                                     std::to_string(t.bytes[i]));
      }
    }
    return t.bytes;
  }

  InputError mismatch(const std::string& expected) const {
    return InputError(scenario_file_, "/data/safetensors", expected);
  }

 private:
  std::string scenario_file_;
  std::string data_path_;
  std::unordered_map<std::string, NamedTensor> by_name_;
};

void checkGradientList(const std::vector<std::vector<double>>& grads, const ProblemData& p,
                       const char* which) {
  if (grads.empty()) return;
  const std::size_t expected = static_cast<std::size_t>(p.hidden) * p.experts;
  if (grads.size() != static_cast<std::size_t>(p.layers)) {
    throw std::invalid_argument(std::string("dumpProblemAndGradients: ") + which + " gradients for " +
                                std::to_string(grads.size()) + " layers, the problem has " +
                                std::to_string(p.layers));
  }
  for (std::size_t l = 0; l < grads.size(); ++l) {
    if (grads[l].size() != expected) {
      throw std::invalid_argument(std::string("dumpProblemAndGradients: ") + which + " gradient of layer " +
                                  std::to_string(l) + " has " + std::to_string(grads[l].size()) +
                                  " values, expected hidden*experts = " + std::to_string(expected));
    }
  }
}

}  // namespace

std::string resolveDataPath(const Scenario& scenario) {
  namespace fs = std::filesystem;
  const fs::path data(scenario.data.safetensors);
  if (data.is_absolute() || scenario.source_file.empty()) return data.string();
  return (fs::path(scenario.source_file).parent_path() / data).string();
}

ProblemData loadProblemFromSafetensors(const Scenario& scenario, const std::string& safetensors_path) {
  const ProblemTensorReader reader(scenario, safetensors_path);
  ProblemData p = problemShapeOf(scenario);
  const std::int64_t B = p.batch, S = p.seq_len, H = p.hidden, E = p.experts, F = p.ffn;

  p.x = reader.floats("x", {B, S, H}, "data.batch x data.seq_len x model.hidden");
  p.y = reader.floats("y", {B, S, H}, "data.batch x data.seq_len x model.hidden");
  p.valid = reader.mask("valid", {B, S}, "data.batch x data.seq_len");
  p.router_weight.resize(p.layers);
  p.expert_in.resize(p.layers);
  p.expert_out.resize(p.layers);
  for (int l = 0; l < p.layers; ++l) {
    p.router_weight[l] = reader.floats(layerTensorName(l, "router_weight"), {H, E},
                                       "model.hidden x model.experts");
    p.expert_in[l] = reader.floats(layerTensorName(l, "expert_in"), {E, H, F},
                                   "model.experts x model.hidden x model.ffn");
    p.expert_out[l] = reader.floats(layerTensorName(l, "expert_out"), {E, F, H},
                                    "model.experts x model.ffn x model.hidden");
  }
  // A file with more layers than the scenario is almost certainly the wrong file or the wrong
  // model.layers: say so rather than silently using a prefix of the model.
  if (reader.contains(layerTensorName(p.layers, "router_weight"))) {
    throw reader.mismatch("at most model.layers = " + std::to_string(p.layers) + " layers, but " +
                          safetensors_path + " also holds " + layerTensorName(p.layers, "router_weight"));
  }
  return p;
}

ProblemData loadProblem(const Scenario& scenario) {
  if (scenario.data.safetensors.empty()) return generateProblem(scenario);
  return loadProblemFromSafetensors(scenario, resolveDataPath(scenario));
}

void dumpProblemAndGradients(const std::string& path, const ProblemData& p,
                             const std::vector<std::vector<double>>& reference_grads,
                             const std::vector<std::vector<double>>& mesh_grads,
                             const std::map<std::string, std::string>& metadata) {
  checkGradientList(reference_grads, p, "reference");
  checkGradientList(mesh_grads, p, "mesh");
  const std::int64_t B = p.batch, S = p.seq_len, H = p.hidden, E = p.experts, F = p.ffn;
  std::vector<NamedTensor> tensors;
  tensors.push_back(makeF64Tensor("x", {B, S, H}, p.x));
  tensors.push_back(makeF64Tensor("y", {B, S, H}, p.y));
  tensors.push_back(makeU8Tensor("valid", {B, S}, p.valid));
  for (int l = 0; l < p.layers; ++l) {
    tensors.push_back(makeF64Tensor(layerTensorName(l, "router_weight"), {H, E}, p.router_weight.at(l)));
    tensors.push_back(makeF64Tensor(layerTensorName(l, "expert_in"), {E, H, F}, p.expert_in.at(l)));
    tensors.push_back(makeF64Tensor(layerTensorName(l, "expert_out"), {E, F, H}, p.expert_out.at(l)));
  }
  for (std::size_t l = 0; l < reference_grads.size(); ++l) {
    tensors.push_back(makeF64Tensor("grad.reference." + layerTensorName(static_cast<int>(l), "router_weight"),
                                    {H, E}, reference_grads[l]));
  }
  for (std::size_t l = 0; l < mesh_grads.size(); ++l) {
    tensors.push_back(makeF64Tensor("grad.mesh." + layerTensorName(static_cast<int>(l), "router_weight"),
                                    {H, E}, mesh_grads[l]));
  }
  std::map<std::string, std::string> all_metadata = metadata;
  all_metadata["format"] = "moe-lbcheck problem";
  all_metadata["format_version"] = "1";
#ifdef MOE_VERSION
  all_metadata["tool_version"] = MOE_VERSION;
#endif
  all_metadata["batch"] = std::to_string(p.batch);
  all_metadata["seq_len"] = std::to_string(p.seq_len);
  all_metadata["hidden"] = std::to_string(p.hidden);
  all_metadata["experts"] = std::to_string(p.experts);
  all_metadata["ffn"] = std::to_string(p.ffn);
  all_metadata["layers"] = std::to_string(p.layers);
  writeSafetensors(path, tensors, all_metadata);
}

}  // namespace moe
