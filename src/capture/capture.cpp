// The capture loader: CAPTURE_DIR/rank{R}.safetensors -> Capture, every rule of the capture format
// (docs/capture-format.md) enforced with the file, the tensor or manifest key, what was expected and
// what was found. The rank files stay memory-mapped; only the manifests, the per-row keys and the
// (small) router weights and gradients are read into memory.
#include "capture/capture.hpp"

#include <algorithm>
#include <atomic>
#include <climits>
#include <cmath>
#include <cstring>
#include <exception>
#include <filesystem>
#include <functional>
#include <iterator>
#include <limits>
#include <map>
#include <nlohmann/json.hpp>
#include <optional>
#include <stdexcept>
#include <string_view>
#include <system_error>
#include <thread>
#include <utility>

#include "capture/capture_manifest.hpp"
#include "capture/float_formats.hpp"
#include "common/errors.hpp"
#include "common/json_input.hpp"
#include "data/safetensors.hpp"

namespace moe {
namespace {

namespace fs = std::filesystem;
using Json = nlohmann::json;

// Two records of the same value (a token's input on two ranks, a layer's weight on two ranks) may
// differ by this many units in the last place: framework kernels may round a copy differently.
constexpr std::uint64_t kMaxUlps = 4;

// Every contract violation: InputError(file, pointer, "expected <what was expected>, <what was found>").
[[noreturn]] void reject(const std::string& file, const std::string& pointer, const std::string& what) {
  throw InputError(file, pointer, "expected " + what);
}

std::string pointerTo(const std::string& tensor_name) { return "/" + json_input::jsonPointerSegment(tensor_name); }
std::string fileName(const std::string& path) { return fs::path(path).filename().string(); }
std::string rankFileName(int rank) { return "rank" + std::to_string(rank) + ".safetensors"; }

std::string listText(const std::vector<int>& values) {
  std::string text = "[";
  for (std::size_t i = 0; i < values.size(); ++i) text += (i ? ", " : "") + std::to_string(values[i]);
  return text + "]";
}

std::string valueText(double value) {
  if (std::isnan(value)) return "NaN";
  if (std::isinf(value)) return value > 0 ? "inf" : "-inf";
  return Json(value).dump();  // shortest text that reads back as the same double
}

// "element 3" or "element (row 3, column 7)" of a tensor with `columns` columns (0 = 1-D).
std::string elementText(std::int64_t index, std::int64_t columns) {
  if (columns <= 0) return "element " + std::to_string(index);
  return "element (row " + std::to_string(index / columns) + ", column " + std::to_string(index % columns) +
         ")";
}

std::int64_t loadI64(const std::uint8_t* data, std::int64_t i) {
  return static_cast<std::int64_t>(loadLittleEndian64(data + 8 * i));
}

// ---------------------------------------------------------------------------------------------
// Directory listing.

bool matchesRankFilePattern(const std::string& name) {  // rank*.safetensors
  static const std::string kPrefix = "rank", kSuffix = ".safetensors";
  return name.size() >= kPrefix.size() + kSuffix.size() && name.compare(0, kPrefix.size(), kPrefix) == 0 &&
         name.compare(name.size() - kSuffix.size(), kSuffix.size(), kSuffix) == 0;
}

// R of a name rank{R}.safetensors written canonically (decimal, no zero padding, at most INT_MAX);
// nullopt for any other name that matches rank*.safetensors.
std::optional<int> rankOfFileName(const std::string& name) {
  const std::string digits = name.substr(4, name.size() - 4 - 12);  // between "rank" and ".safetensors"
  if (digits.empty() || digits.size() > 10 || (digits.size() > 1 && digits[0] == '0')) return std::nullopt;
  long long rank = 0;
  for (char c : digits) {
    if (c < '0' || c > '9') return std::nullopt;
    rank = rank * 10 + (c - '0');
  }
  if (rank > INT_MAX) return std::nullopt;
  return static_cast<int>(rank);
}

// rank -> path of every rank{R}.safetensors in the directory; throws on a misnamed rank*.safetensors.
std::map<int, std::string> listRankFiles(const std::string& directory) {
  std::error_code ec;
  const fs::file_status status = fs::status(directory, ec);
  if (status.type() == fs::file_type::not_found) {
    reject(directory, "", "a capture directory holding rank{R}.safetensors files, but it does not exist");
  }
  if (ec) reject(directory, "", "a readable capture directory (" + ec.message() + ")");
  if (!fs::is_directory(status)) {
    reject(directory, "", "a capture directory holding rank{R}.safetensors files, got a file");
  }
  std::vector<std::string> names;
  fs::directory_iterator it(directory, ec);
  for (; !ec && it != fs::directory_iterator(); it.increment(ec))
    names.push_back(it->path().filename().string());
  if (ec) reject(directory, "", "a readable capture directory (" + ec.message() + ")");
  std::sort(names.begin(), names.end());

  std::map<int, std::string> files;
  for (const std::string& name : names) {
    if (!matchesRankFilePattern(name)) continue;  // not part of the capture
    const std::optional<int> rank = rankOfFileName(name);
    const std::string path = (fs::path(directory) / name).string();
    if (!rank) {
      reject(path, "",
             "a rank file named rank{R}.safetensors with R = 0, 1, 2, ... written without zero "
             "padding; no other file may match rank*.safetensors, got \"" +
                 name + "\"");
    }
    files.emplace(*rank, path);
  }
  return files;
}

// ---------------------------------------------------------------------------------------------
// Tensor names.

enum class Role { kWeight, kGrad, kExpertBias, kInput, kSequence, kPosition, kValid, kTopk };
constexpr Role kMicrobatchRoles[] = {Role::kInput, Role::kSequence, Role::kPosition, Role::kValid,
                                     Role::kTopk};

// The tensor-name suffix of each role, indexed by the role's value.
constexpr const char* kRoleSuffixes[] = {"weight",   "weight.grad", "expert_bias", "input",
                                         "sequence", "position",    "valid",       "topk"};
static_assert(std::size(kRoleSuffixes) == static_cast<std::size_t>(Role::kTopk) + 1);

const char* suffixOf(Role role) { return kRoleSuffixes[static_cast<std::size_t>(role)]; }

std::string tensorName(std::int64_t layer, Role role, std::int64_t microbatch = -1) {
  std::string name = "layer" + std::to_string(layer) + ".";
  if (microbatch >= 0) name += "mb" + std::to_string(microbatch) + ".";
  return name + suffixOf(role);
}

struct ParsedName {
  Role role = Role::kWeight;
  std::int64_t layer = 0;
  std::int64_t microbatch = -1;  // -1 for the per-layer tensors
};

// Reads a canonical decimal index (no zero padding) at text[pos...]; saturates at INT64_MAX so that
// an absurd index reads as "not in layers" rather than as an unknown name.
bool readIndex(std::string_view text, std::size_t& pos, std::int64_t& value) {
  const std::size_t start = pos;
  value = 0;
  while (pos < text.size() && text[pos] >= '0' && text[pos] <= '9') {
    const int digit = text[pos] - '0';
    value = value > (INT64_MAX - digit) / 10 ? INT64_MAX : value * 10 + digit;
    ++pos;
  }
  const std::size_t length = pos - start;
  return length > 0 && !(length > 1 && text[start] == '0');
}

std::optional<ParsedName> parseTensorName(std::string_view name) {
  ParsedName parsed;
  std::size_t pos = 0;
  if (name.substr(0, 5) != "layer") return std::nullopt;
  pos = 5;
  if (!readIndex(name, pos, parsed.layer) || pos >= name.size() || name[pos] != '.') return std::nullopt;
  const std::string_view rest = name.substr(pos + 1);
  for (Role role : {Role::kWeight, Role::kGrad, Role::kExpertBias}) {
    if (rest == suffixOf(role)) {
      parsed.role = role;
      return parsed;
    }
  }
  if (rest.substr(0, 2) != "mb") return std::nullopt;
  pos = 2;
  if (!readIndex(rest, pos, parsed.microbatch) || pos >= rest.size() || rest[pos] != '.') return std::nullopt;
  const std::string_view field = rest.substr(pos + 1);
  for (Role role : kMicrobatchRoles) {
    if (field == suffixOf(role)) {
      parsed.role = role;
      return parsed;
    }
  }
  return std::nullopt;
}

// " (did you mean ...?)" for an unknown tensor name, among the names the table allows with the
// indices the name itself carries (so "layer01.weight" suggests "layer1.weight").
std::string tensorNameHint(const std::string& name) {
  std::vector<std::int64_t> numbers;
  for (std::size_t i = 0; i < name.size();) {
    if (name[i] >= '0' && name[i] <= '9') {
      std::int64_t value = 0;
      while (i < name.size() && name[i] >= '0' && name[i] <= '9') {
        value = std::min<std::int64_t>(value * 10 + (name[i] - '0'), INT32_MAX);
        ++i;
      }
      numbers.push_back(value);
    } else {
      ++i;
    }
  }
  const std::int64_t layer = numbers.empty() ? 0 : numbers[0];
  const std::int64_t microbatch = numbers.size() < 2 ? 0 : numbers[1];
  std::vector<std::string> candidates;
  for (Role role : {Role::kWeight, Role::kGrad, Role::kExpertBias})
    candidates.push_back(tensorName(layer, role));
  for (Role role : kMicrobatchRoles) candidates.push_back(tensorName(layer, role, microbatch));
  return json_input::didYouMean(name, candidates);
}

// ---------------------------------------------------------------------------------------------
// One rank file: its manifest and its tensors, checked on their own.

struct MicrobatchTensors {
  std::int64_t microbatch = 0;
  const TensorView* tensors[5] = {};  // by kMicrobatchRoles order: input, sequence, position, valid, topk
  CaptureFloat input_dtype = CaptureFloat::kF32;
  std::int64_t rows = 0;
  const TensorView* input() const { return tensors[0]; }
  const TensorView* sequence() const { return tensors[1]; }
  const TensorView* position() const { return tensors[2]; }
  const TensorView* valid() const { return tensors[3]; }
  const TensorView* topk() const { return tensors[4]; }
};

struct RankLayer {
  int layer = 0;
  const TensorView* weight = nullptr;
  const TensorView* grad = nullptr;
  const TensorView* expert_bias = nullptr;
  CaptureFloat weight_dtype = CaptureFloat::kF32, grad_dtype = CaptureFloat::kF32,
               bias_dtype = CaptureFloat::kF32;
  int experts = 0, hidden = 0;
  std::vector<MicrobatchTensors> microbatches;  // ascending index
};

struct RankFile {
  int rank = 0;
  std::string path;
  SafetensorsView view;
  CaptureManifest manifest;
  std::map<int, RankLayer> layers;
};

class RankFileChecker {
 public:
  explicit RankFileChecker(RankFile& rank) : rank_(rank), file_(rank.path) {}

  // Classifies every tensor by name, then checks each layer's tensors: presence, dtype, shape, values.
  void run() {
    struct Slots {
      const TensorView* per_layer[3] = {};
      std::map<std::int64_t, MicrobatchTensors> microbatches;
    };
    std::map<int, Slots> slots;
    const CaptureManifest& manifest = rank_.manifest;
    for (const TensorView& tensor : rank_.view.tensors()) {
      const std::optional<ParsedName> parsed = parseTensorName(tensor.name);
      if (!parsed) {
        fail(tensor,
             "a tensor name of the capture table (layer{l}.weight, layer{l}.weight.grad, "
             "layer{l}.expert_bias, layer{l}.mb{m}.input, .sequence, .position, .valid, .topk; "
             "l and m without zero padding), got \"" +
                 tensor.name + "\"" + tensorNameHint(tensor.name));
      }
      if (!std::binary_search(manifest.layers.begin(), manifest.layers.end(), parsed->layer)) {
        fail(tensor, "a tensor of a layer in this rank's /layers " + listText(manifest.layers) +
                         ", got layer " + std::to_string(parsed->layer));
      }
      Slots& layer_slots = slots[static_cast<int>(parsed->layer)];
      if (parsed->microbatch < 0) {
        layer_slots.per_layer[static_cast<int>(parsed->role)] = &tensor;
        continue;
      }
      if (parsed->microbatch >= manifest.mesh.microbatches) {
        fail(tensor,
             "a microbatch index m < /mesh/microbatches = " + std::to_string(manifest.mesh.microbatches) +
                 ", got m = " + std::to_string(parsed->microbatch));
      }
      MicrobatchTensors& mb = layer_slots.microbatches[parsed->microbatch];
      mb.microbatch = parsed->microbatch;
      mb.tensors[static_cast<int>(parsed->role) - static_cast<int>(Role::kInput)] = &tensor;
    }

    for (int layer : manifest.layers) {
      Slots& layer_slots = slots[layer];
      RankLayer checked;
      checked.layer = layer;
      checked.weight = layer_slots.per_layer[0];
      checked.grad = layer_slots.per_layer[1];
      checked.expert_bias = layer_slots.per_layer[2];
      checkLayerTensors(checked);
      for (auto& [m, mb] : layer_slots.microbatches) {
        checkMicrobatch(checked, mb);
        checked.microbatches.push_back(mb);
      }
      rank_.layers.emplace(layer, std::move(checked));
    }
  }

 private:
  [[noreturn]] void fail(const TensorView& tensor, const std::string& what) const {
    reject(file_, pointerTo(tensor.name), what);
  }
  [[noreturn]] void failMissing(const std::string& name, const std::string& what) const {
    reject(file_, pointerTo(name), what + ", missing");
  }

  CaptureFloat requireFloat(const TensorView& tensor) const {
    CaptureFloat dtype{};
    if (!parseCaptureFloat(tensor.dtype, dtype))
      fail(tensor, "dtype F64, F32, BF16 or F16, got " + tensor.dtype);
    return dtype;
  }
  void requireDtype(const TensorView& tensor, const char* dtype) const {
    if (tensor.dtype != dtype) fail(tensor, std::string("dtype ") + dtype + ", got " + tensor.dtype);
  }
  void requireShape(const TensorView& tensor, const std::vector<std::int64_t>& shape,
                    const std::string& why) const {
    if (tensor.shape != shape) {
      fail(tensor, "shape " + shapeToString(shape) + " (" + why + "), got " + shapeToString(tensor.shape));
    }
  }
  void requireFinite(const TensorView& tensor, CaptureFloat dtype, std::int64_t columns) const {
    const std::int64_t bad = firstNonFinite(tensor.data, static_cast<std::size_t>(tensor.elements), dtype);
    if (bad >= 0) {
      fail(tensor, "finite values, " + elementText(bad, columns) + " is " +
                       valueText(loadCaptureFloat(tensor.data, static_cast<std::size_t>(bad), dtype)));
    }
  }

  void checkLayerTensors(RankLayer& layer) const {
    const std::string weight_name = tensorName(layer.layer, Role::kWeight);
    if (layer.weight == nullptr) {
      failMissing(weight_name, "the router weight [E, H] (F64, F32, BF16 or F16) of layer " +
                                   std::to_string(layer.layer) + ", which /layers lists");
    }
    const TensorView& weight = *layer.weight;
    layer.weight_dtype = requireFloat(weight);
    if (weight.shape.size() != 2 || weight.shape[0] < 1 || weight.shape[1] < 1 || weight.shape[0] > INT_MAX ||
        weight.shape[1] > INT_MAX) {
      fail(weight,
           "shape [E, H] with 1 <= E, H < 2^31 (experts, hidden), got " + shapeToString(weight.shape));
    }
    layer.experts = static_cast<int>(weight.shape[0]);
    layer.hidden = static_cast<int>(weight.shape[1]);
    const int top_k = rank_.manifest.objective.top_k;
    if (top_k > layer.experts) {
      reject(file_, "/objective/top_k",
             "top_k <= experts (E = " + std::to_string(layer.experts) + " from " + weight_name + " " +
                 shapeToString(weight.shape) + "), got " + std::to_string(top_k));
    }
    requireFinite(weight, layer.weight_dtype, layer.hidden);

    const std::string grad_name = tensorName(layer.layer, Role::kGrad);
    if (layer.grad == nullptr) {
      failMissing(grad_name,
                  "the router weight's gradient " + shapeToString(weight.shape) + " (F64, F32, BF16 or F16)");
    }
    layer.grad_dtype = requireFloat(*layer.grad);
    requireShape(*layer.grad, weight.shape, "the shape of " + weight_name);
    requireFinite(*layer.grad, layer.grad_dtype, layer.hidden);

    if (layer.expert_bias != nullptr) {
      layer.bias_dtype = requireFloat(*layer.expert_bias);
      requireShape(*layer.expert_bias, {weight.shape[0]}, "[E], E from " + weight_name);
      requireFinite(*layer.expert_bias, layer.bias_dtype, 0);
    }
  }

  void checkMicrobatch(const RankLayer& layer, MicrobatchTensors& mb) const {
    const std::int64_t m = mb.microbatch;
    const std::string present = [&] {
      for (const TensorView* t : mb.tensors)
        if (t != nullptr) return t->name;
      return std::string();
    }();
    const auto requirePresent = [&](Role role, const std::string& what) -> const TensorView& {
      const TensorView* t = mb.tensors[static_cast<int>(role) - static_cast<int>(Role::kInput)];
      if (t == nullptr) {
        failMissing(tensorName(layer.layer, role, m),
                    what + " (every microbatch a rank records has input, sequence, position and valid; " +
                        present + " is recorded)");
      }
      return *t;
    };
    const std::string weight_name = tensorName(layer.layer, Role::kWeight);

    const TensorView& input =
        requirePresent(Role::kInput, "the router input rows [n, H] (F64, F32, BF16 or F16)");
    mb.input_dtype = requireFloat(input);
    if (input.shape.size() != 2 || input.shape[1] != layer.hidden) {
      fail(input, "shape [n, " + std::to_string(layer.hidden) + "] (n rows of hidden size H from " +
                      weight_name + "), got " + shapeToString(input.shape));
    }
    mb.rows = input.shape[0];
    const std::vector<std::int64_t> per_row = {mb.rows};
    const std::string per_row_why = "one entry per row of " + input.name + " " + shapeToString(input.shape);

    const TensorView& sequence = requirePresent(Role::kSequence, "the rows' sequence indices [n] (I64)");
    requireDtype(sequence, "I64");
    requireShape(sequence, per_row, per_row_why);
    const TensorView& position = requirePresent(Role::kPosition, "the rows' positions [n] (I64)");
    requireDtype(position, "I64");
    requireShape(position, per_row, per_row_why);
    const TensorView& valid = requirePresent(Role::kValid, "the rows' validity [n] (U8 or BOOL)");
    if (valid.dtype != "U8" && valid.dtype != "BOOL") fail(valid, "dtype U8 or BOOL, got " + valid.dtype);
    requireShape(valid, per_row, per_row_why);
    const TensorView* topk = mb.topk();
    const int k = rank_.manifest.objective.top_k;
    if (topk != nullptr) {
      requireDtype(*topk, "I64");
      requireShape(*topk, {mb.rows, k}, "n rows of top_k = " + std::to_string(k) + " expert indices");
    }

    requireFinite(input, mb.input_dtype, layer.hidden);
    for (std::int64_t i = 0; i < mb.rows; ++i) {
      const std::int64_t s = loadI64(sequence.data, i);
      if (s < 0)
        fail(sequence, "sequence indices >= 0, element " + std::to_string(i) + " is " + std::to_string(s));
    }
    const int seq_len = rank_.manifest.seq_len;
    for (std::int64_t i = 0; i < mb.rows; ++i) {
      const std::int64_t p = loadI64(position.data, i);
      if (p < 0 || p >= seq_len) {
        fail(position, "positions in [0, seq_len = " + std::to_string(seq_len) + "), element " +
                           std::to_string(i) + " is " + std::to_string(p));
      }
    }
    for (std::int64_t i = 0; i < mb.rows; ++i) {
      if (valid.data[i] > 1) {
        fail(valid, "values 0 or 1, element " + std::to_string(i) + " is " + std::to_string(valid.data[i]));
      }
    }
    if (topk != nullptr) {
      std::vector<std::int64_t> row(static_cast<std::size_t>(k));
      for (std::int64_t r = 0; r < mb.rows; ++r) {
        for (int j = 0; j < k; ++j) {
          row[j] = loadI64(topk->data, r * k + j);
          if (row[j] < 0 || row[j] >= layer.experts) {
            fail(*topk, "expert indices in [0, E = " + std::to_string(layer.experts) + "), " +
                            elementText(r * k + j, k) + " is " + std::to_string(row[j]));
          }
        }
        std::sort(row.begin(), row.end());
        const auto repeated = std::adjacent_find(row.begin(), row.end());
        if (repeated != row.end()) {
          fail(*topk, "distinct experts within each row, row " + std::to_string(r) + " lists expert " +
                          std::to_string(*repeated) + " more than once");
        }
      }
    }
  }

  RankFile& rank_;
  const std::string& file_;
};

// Runs body(i) for every i in [0, count) on up to hardware_concurrency threads (at most 8): the
// scans and comparisons of a capture read hundreds of MB and are bound by memory bandwidth, which one
// core does not saturate. Every index runs; the exception of the lowest index that threw is
// rethrown unchanged, so the error reported is the one a sequential loop would report first.
template <typename Body>
void parallelFor(std::size_t count, const Body& body) {
  const std::size_t workers =
      std::min<std::size_t>({count, std::max(1u, std::thread::hardware_concurrency()), 8});
  std::vector<std::exception_ptr> errors(count);
  std::atomic<std::size_t> next{0};
  const auto work = [&] {
    for (std::size_t i = next++; i < count; i = next++) {
      try {
        body(i);
      } catch (...) {
        errors[i] = std::current_exception();  // carried to the calling thread, not handled
      }
    }
  };
  std::vector<std::thread> threads;
  for (std::size_t w = 1; w < workers; ++w) threads.emplace_back(work);
  work();
  for (std::thread& t : threads) t.join();
  for (const std::exception_ptr& error : errors)
    if (error) std::rethrow_exception(error);
}

// ---------------------------------------------------------------------------------------------
// Across rank files.

// The manifest values every rank file must share, rendered for comparison and for the message.
struct SharedField {
  const char* pointer;
  std::function<std::string(const CaptureManifest&)> render;
};

const std::vector<SharedField>& sharedFields() {
  static const std::vector<SharedField> fields = {
      {"/world_size", [](const CaptureManifest& m) { return std::to_string(m.world_size); }},
      {"/mesh/dp_size", [](const CaptureManifest& m) { return std::to_string(m.mesh.dp_size); }},
      {"/mesh/cp_size", [](const CaptureManifest& m) { return std::to_string(m.mesh.cp_size); }},
      {"/mesh/pp_size", [](const CaptureManifest& m) { return std::to_string(m.mesh.pp_size); }},
      {"/mesh/tp_size", [](const CaptureManifest& m) { return std::to_string(m.mesh.tp_size); }},
      {"/mesh/ep_size", [](const CaptureManifest& m) { return std::to_string(m.mesh.ep_size); }},
      {"/mesh/microbatches", [](const CaptureManifest& m) { return std::to_string(m.mesh.microbatches); }},
      {"/seq_len", [](const CaptureManifest& m) { return std::to_string(m.seq_len); }},
      {"/objective/aux_type", [](const CaptureManifest& m) { return std::string(toString(m.objective.aux_scope)); }},
      {"/objective/coeff", [](const CaptureManifest& m) { return valueText(m.objective.aux_coeff); }},
      {"/objective/z_loss_coeff", [](const CaptureManifest& m) { return valueText(m.objective.z_coeff); }},
      {"/objective/z_loss_scope", [](const CaptureManifest& m) { return std::string(toString(m.objective.z_scope)); }},
      {"/objective/top_k", [](const CaptureManifest& m) { return std::to_string(m.objective.top_k); }},
      {"/objective/score", [](const CaptureManifest& m) { return std::string(toString(m.objective.score)); }},
      {"/objective/norm_topk_prob",
       [](const CaptureManifest& m) { return std::string(m.objective.norm_topk_prob ? "true" : "false"); }},
      {"/objective/exclude_padding",
       [](const CaptureManifest& m) { return std::string(m.objective.exclude_padding ? "true" : "false"); }},
      {"/objective/group_weighting",
       [](const CaptureManifest& m) { return std::string(toString(m.objective.group_weighting)); }},
      {"/objective/compute_dtype",
       [](const CaptureManifest& m) {
         return m.objective.compute_dtype_given ? std::string(toString(m.objective.compute_dtype))
                                                : std::string("absent (the gradient's dtype)");
       }},
      {"/router_inputs_detached",
       [](const CaptureManifest& m) { return std::string(m.router_inputs_detached ? "true" : "false"); }},
      {"/main_loss_scale", [](const CaptureManifest& m) { return valueText(m.main_loss_scale); }},
  };
  return fields;
}

void requireSharedValues(const RankFile& first, const RankFile& other) {
  for (const SharedField& field : sharedFields()) {
    const std::string expected = field.render(first.manifest), got = field.render(other.manifest);
    if (expected != got) {
      reject(
          other.path, field.pointer,
          "the same value in every rank file, " + fileName(first.path) + " has " + expected + ", got " + got);
    }
  }
}

// The tolerance-relevant DType of a gradient's element type (F16 judged as coarsely as bfloat16).
DType dtypeOfGradient(CaptureFloat grad) {
  switch (grad) {
    case CaptureFloat::kF64:
      return DType::kFloat64;
    case CaptureFloat::kF32:
      return DType::kFloat32;
    case CaptureFloat::kBF16:
    case CaptureFloat::kF16:
      return DType::kBFloat16;
  }
  return DType::kFloat32;
}
int coarseness(DType dtype) { return dtype == DType::kFloat64 ? 0 : dtype == DType::kFloat32 ? 1 : 2; }

// Index of the first element of two arrays more than kMaxUlps apart, or -1; `ulps` gets that
// distance. Arrays of one dtype are compared as bit patterns (memcmp first: equal copies are the
// common case); mixed dtypes in the ulps of the coarser one.
std::int64_t firstDifference(const std::uint8_t* a, CaptureFloat a_dtype, const std::uint8_t* b,
                             CaptureFloat b_dtype, std::size_t count, double& ulps) {
  if (a_dtype == b_dtype) {
    if (std::memcmp(a, b, count * captureFloatSize(a_dtype)) == 0) return -1;
    for (std::size_t i = 0; i < count; ++i) {
      const std::uint64_t distance = ulpDistance(a, b, i, a_dtype);
      if (distance > kMaxUlps) {
        ulps = static_cast<double>(distance);
        return static_cast<std::int64_t>(i);
      }
    }
    return -1;
  }
  const CaptureFloat coarser =
      captureFloatPrecision(a_dtype) < captureFloatPrecision(b_dtype) ? a_dtype : b_dtype;
  for (std::size_t i = 0; i < count; ++i) {
    const double x = loadCaptureFloat(a, i, a_dtype), y = loadCaptureFloat(b, i, b_dtype);
    const double unit = ulpOf(coarser, std::max(std::fabs(x), std::fabs(y)));
    if (std::fabs(x - y) > static_cast<double>(kMaxUlps) * unit) {
      ulps = std::fabs(x - y) / unit;
      return static_cast<std::int64_t>(i);
    }
  }
  return -1;
}

std::string dtypesText(CaptureFloat a, CaptureFloat b) {
  return a == b ? std::string(toString(a)) : std::string(toString(a)) + "/" + toString(b);
}

std::vector<double> toDoubles(const TensorView& tensor, CaptureFloat dtype) {
  std::vector<double> values(static_cast<std::size_t>(tensor.elements));
  convertToDouble(tensor.data, values.size(), dtype, values.data());
  return values;
}

// One recorded row of a layer: which rank, microbatch and row it is, keyed by token.
struct RowRecord {
  std::int64_t sequence = 0, position = 0;
  int holder = 0;      // index into the layer's holders
  int microbatch = 0;  // index into that holder's RankLayer::microbatches
  std::int64_t row = 0;
  bool operator<(const RowRecord& o) const {
    if (sequence != o.sequence) return sequence < o.sequence;
    if (position != o.position) return position < o.position;
    if (holder != o.holder) return holder < o.holder;
    if (microbatch != o.microbatch) return microbatch < o.microbatch;
    return row < o.row;
  }
};

class LayerAssembler {
 public:
  LayerAssembler(int layer, std::vector<const RankFile*> holders)
      : layer_(layer), holders_(std::move(holders)) {}

  CaptureLayer run() {
    CaptureLayer out;
    out.layer = layer_;
    const RankFile& first = *holders_.front();
    const RankLayer& reference = rankLayer(0);
    out.experts = reference.experts;
    out.hidden = reference.hidden;
    for (const RankFile* holder : holders_) out.ranks.push_back(holder->rank);
    checkSameRouter();
    out.weight = toDoubles(*reference.weight, reference.weight_dtype);
    if (reference.expert_bias != nullptr)
      out.expert_bias = toDoubles(*reference.expert_bias, reference.bias_dtype);
    out.grad_dtype = reference.grad_dtype;
    out.grads.resize(holders_.size());
    parallelFor(holders_.size(), [&](std::size_t h) {
      out.grads[h] = toDoubles(*rankLayer(h).grad, rankLayer(h).grad_dtype);
    });
    const bool with_topk = checkTopkRecordedEverywhereOrNowhere();
    assembleTokens(out, with_topk);
    if (out.tokens.empty()) {
      reject(first.path, pointerTo(tensorName(layer_, Role::kInput, 0)),
             "router input rows of layer " + std::to_string(layer_) +
                 " from at least one rank, but no rank holding it records any");
    }
    return out;
  }

 private:
  const RankLayer& rankLayer(std::size_t holder) const { return holders_[holder]->layers.at(layer_); }

  // Every holder: the same shape, the same weight (4 ulps), the same expert bias or none anywhere.
  void checkSameRouter() const {
    const RankFile& first = *holders_.front();
    const RankLayer& reference = rankLayer(0);
    for (std::size_t h = 1; h < holders_.size(); ++h) {
      const RankFile& other = *holders_[h];
      const RankLayer& layer = rankLayer(h);
      if (layer.weight->shape != reference.weight->shape) {
        reject(other.path, pointerTo(layer.weight->name),
               "shape " + shapeToString(reference.weight->shape) + " as in " + fileName(first.path) +
                   " (every rank holding layer " + std::to_string(layer_) + " holds the same router), got " +
                   shapeToString(layer.weight->shape));
      }
      requireSame(first, *reference.weight, reference.weight_dtype, other, *layer.weight, layer.weight_dtype,
                  reference.hidden, "weight (a capture is of one step)");
      if ((reference.expert_bias == nullptr) != (layer.expert_bias == nullptr)) {
        const RankFile& without = reference.expert_bias == nullptr ? first : other;
        const RankFile& with = reference.expert_bias == nullptr ? other : first;
        reject(without.path, pointerTo(tensorName(layer_, Role::kExpertBias)),
               "an expert bias, as " + fileName(with.path) +
                   " records one (every rank holding the layer records it, or none does), missing");
      }
      if (layer.expert_bias != nullptr) {
        requireSame(first, *reference.expert_bias, reference.bias_dtype, other, *layer.expert_bias,
                    layer.bias_dtype, 0, "expert bias (a capture is of one step)");
      }
    }
  }

  void requireSame(const RankFile& first, const TensorView& a, CaptureFloat a_dtype, const RankFile& other,
                   const TensorView& b, CaptureFloat b_dtype, std::int64_t columns, const char* what) const {
    double ulps = 0;
    const std::int64_t at =
        firstDifference(a.data, a_dtype, b.data, b_dtype, static_cast<std::size_t>(a.elements), ulps);
    if (at < 0) return;
    reject(other.path, pointerTo(b.name),
           std::string("the same ") + what + " as " + fileName(first.path) + " to " +
               std::to_string(kMaxUlps) + " ulps of " + dtypesText(a_dtype, b_dtype) + ", but " +
               elementText(at, columns) + " is " + valueText(loadCaptureFloat(b.data, at, b_dtype)) +
               " here and " + valueText(loadCaptureFloat(a.data, at, a_dtype)) + " there (" +
               valueText(ulps) + " ulps apart)");
  }

  // Whether the layer's top-k is recorded (then by every microbatch of every holder).
  bool checkTopkRecordedEverywhereOrNowhere() const {
    const RankFile* with = nullptr;
    const MicrobatchTensors* with_mb = nullptr;
    for (std::size_t h = 0; h < holders_.size() && with == nullptr; ++h)
      for (const MicrobatchTensors& mb : rankLayer(h).microbatches)
        if (mb.topk() != nullptr) {
          with = holders_[h];
          with_mb = &mb;
          break;
        }
    if (with == nullptr) return false;
    for (std::size_t h = 0; h < holders_.size(); ++h) {
      for (const MicrobatchTensors& mb : rankLayer(h).microbatches) {
        if (mb.topk() != nullptr) continue;
        reject(holders_[h]->path, pointerTo(tensorName(layer_, Role::kTopk, mb.microbatch)),
               "a recorded top-k, as " + fileName(with->path) + " records " + with_mb->topk()->name +
                   " (topk is recorded for every microbatch of a layer on every rank, or for none), missing");
      }
    }
    return true;
  }

  // Where a row lies, for messages: "rank1.safetensors layer0.mb1 row 3".
  std::string rowText(const RowRecord& r) const {
    return fileName(holders_[r.holder]->path) + " " + mb(r).input()->name + " row " + std::to_string(r.row);
  }
  const MicrobatchTensors& mb(const RowRecord& r) const {
    return rankLayer(r.holder).microbatches[r.microbatch];
  }
  const RankFile& rankOf(const RowRecord& r) const { return *holders_[r.holder]; }
  std::string tokenText(const RowRecord& r) const {
    return "token (sequence " + std::to_string(r.sequence) + ", position " + std::to_string(r.position) + ")";
  }
  const std::uint8_t* inputRow(const RowRecord& r) const {
    const MicrobatchTensors& m = mb(r);
    return m.input()->data +
           static_cast<std::size_t>(r.row) * rankLayer(r.holder).hidden * captureFloatSize(m.input_dtype);
  }

  // The same token on two ranks: same validity, (dp, microbatch), top-k (as a set) and input.
  void requireSameToken(const RowRecord& a, const RowRecord& b) const {
    const MicrobatchTensors &ma = mb(a), &mbb = mb(b);
    const RankFile &ra = rankOf(a), &rb = rankOf(b);
    const std::string where = tokenText(a) + " is recorded by " + rowText(a) + " and by " + rowText(b);
    const std::uint8_t va = ma.valid()->data[a.row], vb = mbb.valid()->data[b.row];
    if (va != vb) {
      reject(rb.path, pointerTo(mbb.valid()->name),
             "the same validity for a token recorded by several ranks; " + where + ", valid " +
                 std::to_string(va) + " there and " + std::to_string(vb) + " here");
    }
    if (ra.manifest.mesh.dp != rb.manifest.mesh.dp || ma.microbatch != mbb.microbatch) {
      reject(rb.path, pointerTo(mbb.sequence()->name),
             "the same (mesh.dp, microbatch) for a token recorded by several ranks; " + where + ", (dp " +
                 std::to_string(ra.manifest.mesh.dp) + ", microbatch " + std::to_string(ma.microbatch) +
                 ") there and (dp " + std::to_string(rb.manifest.mesh.dp) + ", microbatch " +
                 std::to_string(mbb.microbatch) + ") here");
    }
    if (ma.topk() != nullptr && mbb.topk() != nullptr) {
      const int k = ra.manifest.objective.top_k;
      std::vector<std::int64_t> ka(k), kb(k);
      for (int j = 0; j < k; ++j) {
        ka[j] = loadI64(ma.topk()->data, a.row * k + j);
        kb[j] = loadI64(mbb.topk()->data, b.row * k + j);
      }
      std::sort(ka.begin(), ka.end());
      std::sort(kb.begin(), kb.end());
      if (ka != kb) {
        const auto text = [](const std::vector<std::int64_t>& v) {
          std::string s = "{";
          for (std::size_t i = 0; i < v.size(); ++i) s += (i ? ", " : "") + std::to_string(v[i]);
          return s + "}";
        };
        reject(rb.path, pointerTo(mbb.topk()->name),
               "the same recorded top-k for a token recorded by several ranks; " + where + ", experts " +
                   text(ka) + " there and " + text(kb) + " here");
      }
    }
    double ulps = 0;
    const std::int64_t at = firstDifference(inputRow(a), ma.input_dtype, inputRow(b), mbb.input_dtype,
                                            static_cast<std::size_t>(rankLayer(a.holder).hidden), ulps);
    if (at >= 0) {
      reject(rb.path, pointerTo(mbb.input()->name),
             "the same input (to " + std::to_string(kMaxUlps) + " ulps of " +
                 dtypesText(ma.input_dtype, mbb.input_dtype) + ") for a token recorded by several ranks; " +
                 where + ", and element " + std::to_string(at) + " is " +
                 valueText(loadCaptureFloat(inputRow(a), at, ma.input_dtype)) + " there and " +
                 valueText(loadCaptureFloat(inputRow(b), at, mbb.input_dtype)) + " here (" + valueText(ulps) +
                 " ulps apart)");
    }
  }

  void assembleTokens(CaptureLayer& out, bool with_topk) const {
    std::vector<RowRecord> rows;
    std::size_t total = 0;
    for (std::size_t h = 0; h < holders_.size(); ++h)
      for (const MicrobatchTensors& m : rankLayer(h).microbatches) total += static_cast<std::size_t>(m.rows);
    rows.reserve(total);
    for (std::size_t h = 0; h < holders_.size(); ++h) {
      const std::vector<MicrobatchTensors>& mbs = rankLayer(h).microbatches;
      for (std::size_t i = 0; i < mbs.size(); ++i) {
        for (std::int64_t r = 0; r < mbs[i].rows; ++r) {
          rows.push_back(RowRecord{loadI64(mbs[i].sequence()->data, r), loadI64(mbs[i].position()->data, r),
                                   static_cast<int>(h), static_cast<int>(i), r});
        }
      }
    }
    std::sort(rows.begin(), rows.end());

    // Runs of rows of one token; their checks (reading every duplicate's input) run in parallel.
    std::vector<std::size_t> run_starts;
    for (std::size_t i = 0; i < rows.size(); ++i) {
      if (i == 0 || rows[i].sequence != rows[i - 1].sequence || rows[i].position != rows[i - 1].position)
        run_starts.push_back(i);
    }
    run_starts.push_back(rows.size());
    const std::size_t runs = run_starts.size() - 1;
    constexpr std::size_t kRunsPerTask = 64;
    parallelFor((runs + kRunsPerTask - 1) / kRunsPerTask, [&](std::size_t task) {
      for (std::size_t run = task * kRunsPerTask; run < std::min(runs, (task + 1) * kRunsPerTask); ++run) {
        const RowRecord& first = rows[run_starts[run]];
        for (std::size_t i = run_starts[run] + 1; i < run_starts[run + 1]; ++i) {
          if (rows[i].holder == rows[i - 1].holder) {
            reject(rankOf(rows[i]).path, pointerTo(mb(rows[i]).position()->name),
                   "each token at most once per rank, but " + tokenText(first) + " is recorded by " +
                       rowText(rows[i - 1]) + " and again by " + rowText(rows[i]));
          }
          requireSameToken(first, rows[i]);
        }
      }
    });

    // Each token from its first record (the lowest rank's).
    const int k = holders_.front()->manifest.objective.top_k;
    out.tokens.reserve(runs);
    out.row_data.reserve(runs);
    out.row_dtype.reserve(runs);
    if (with_topk) out.topk.reserve(runs * static_cast<std::size_t>(k));
    for (std::size_t run = 0; run < runs; ++run) {
      const RowRecord& first = rows[run_starts[run]];
      const MicrobatchTensors& m = mb(first);
      out.tokens.push_back(CaptureToken{first.sequence, first.position, m.valid()->data[first.row] != 0,
                                        rankOf(first).manifest.mesh.dp, static_cast<int>(m.microbatch)});
      out.row_data.push_back(inputRow(first));
      out.row_dtype.push_back(m.input_dtype);
      if (with_topk) {
        for (int j = 0; j < k; ++j) out.topk.push_back(loadI64(m.topk()->data, first.row * k + j));
      }
    }
  }

  int layer_;
  std::vector<const RankFile*> holders_;
};

// Every layer sees the same tokens as the first one; the message names a token one layer lacks.
void requireSameTokenSets(const std::vector<CaptureLayer>& layers, const std::vector<RankFile>& ranks) {
  const CaptureLayer& base = layers.front();
  for (std::size_t l = 1; l < layers.size(); ++l) {
    const CaptureLayer& other = layers[l];
    std::size_t i = 0, j = 0;
    while (i < base.tokens.size() || j < other.tokens.size()) {
      const bool base_has = i < base.tokens.size(), other_has = j < other.tokens.size();
      if (base_has && other_has && base.tokens[i].sequence == other.tokens[j].sequence &&
          base.tokens[i].position == other.tokens[j].position) {
        ++i, ++j;
        continue;
      }
      const bool base_first =
          !other_has || (base_has && std::make_pair(base.tokens[i].sequence, base.tokens[i].position) <
                                         std::make_pair(other.tokens[j].sequence, other.tokens[j].position));
      const CaptureLayer& with = base_first ? base : other;
      const CaptureLayer& without = base_first ? other : base;
      const CaptureToken& token = base_first ? base.tokens[i] : other.tokens[j];
      // Name the file where the token is missing: the lowest rank of `without` with the token's dp.
      int blamed = without.ranks.front();
      for (int r : without.ranks)
        if (ranks[r].manifest.mesh.dp == token.dp) {
          blamed = r;
          break;
        }
      std::string holders;
      for (int r : without.ranks) holders += (holders.empty() ? "" : ", ") + std::to_string(r);
      reject(ranks[blamed].path, pointerTo(tensorName(without.layer, Role::kSequence, token.microbatch)),
             "the same token set in every layer, but token (sequence " + std::to_string(token.sequence) +
                 ", position " + std::to_string(token.position) + ") of layer " + std::to_string(with.layer) +
                 " (dp " + std::to_string(token.dp) + ", microbatch " + std::to_string(token.microbatch) +
                 ") is recorded by no rank holding layer " + std::to_string(without.layer) + " (ranks " +
                 holders + ")");
    }
  }
}

}  // namespace

const char* toString(CaptureFloat dtype) { return captureFloatFormat(dtype).name; }

void CaptureLayer::readRows(std::int64_t begin, std::int64_t count, double* out) const {
  if (begin < 0 || count < 0 || begin > static_cast<std::int64_t>(tokens.size()) ||
      count > static_cast<std::int64_t>(tokens.size()) - begin) {
    throw std::out_of_range("CaptureLayer::readRows: rows [" + std::to_string(begin) + ", " +
                            std::to_string(begin + count) + ") of " + std::to_string(tokens.size()));
  }
  const auto width = static_cast<std::size_t>(hidden);
  for (std::int64_t t = 0; t < count; ++t) {
    convertToDouble(row_data[begin + t], width, row_dtype[begin + t],
                    out + static_cast<std::size_t>(t) * width);
    // The row is in `out` now: its pages need not stay resident (the reference streams the rows).
    releaseResidentPages(row_data[begin + t], width * captureFloatSize(row_dtype[begin + t]));
  }
}

Capture loadCapture(const std::string& directory) {
  const std::map<int, std::string> files = listRankFiles(directory);
  if (files.empty()) {
    reject(directory, "",
           "rank0.safetensors .. rank{N-1}.safetensors, one per rank of the job; "
           "found no file named rank*.safetensors");
  }
  const std::string rank0_path = (fs::path(directory) / rankFileName(0)).string();
  if (files.begin()->first != 0) {
    reject(rank0_path, "",
           "a rank file (every rank 0 .. world_size-1 has one), missing; the lowest "
           "rank file is " +
               fileName(files.begin()->second));
  }

  Capture capture;
  capture.directory = directory;
  std::vector<RankFile> ranks;
  const auto openRank = [&](int rank, const std::string& path) {
    RankFile file;
    file.rank = rank;
    file.path = path;
    file.view = SafetensorsView::open(path, /*prefault=*/true);  // every byte is scanned below
    file.manifest = readCaptureManifest(file.view, rank);
    capture.bytes_on_disk += file.view.fileSize();
    return file;
  };
  RankFile rank0 = openRank(0, files.begin()->second);
  const int world_size = rank0.manifest.world_size;
  for (int r = 0; r < world_size; ++r) {
    if (files.count(r) == 0) {
      reject((fs::path(directory) / rankFileName(r)).string(), "",
             "a rank file: world_size is " + std::to_string(world_size) + " (" + rankFileName(0) +
                 " /world_size), so ranks 0 .. " + std::to_string(world_size - 1) +
                 " each have one; this one is missing");
    }
  }
  if (files.rbegin()->first >= world_size) {
    const auto extra = files.lower_bound(world_size);
    reject(extra->second, "",
           "no file beyond rank " + std::to_string(world_size - 1) + ": world_size is " +
               std::to_string(world_size) + " (" + rankFileName(0) + " /world_size), got rank " +
               std::to_string(extra->first));
  }

  ranks.reserve(static_cast<std::size_t>(world_size));  // RankFile holds pointers into its own view
  ranks.push_back(std::move(rank0));
  for (int r = 1; r < world_size; ++r) {
    ranks.push_back(openRank(r, files.at(r)));
    requireSharedValues(ranks.front(), ranks.back());
  }
  parallelFor(ranks.size(), [&](std::size_t r) { RankFileChecker(ranks[r]).run(); });

  // compute_dtype's default: the coarsest gradient dtype in the capture (the one the tolerance must
  // allow for), filled into every manifest that leaves it out (and then all of them do).
  DType coarsest = DType::kFloat64;
  bool any_gradient = false;
  for (const RankFile& rank : ranks)
    for (const auto& [l, layer] : rank.layers) {
      const DType d = dtypeOfGradient(layer.grad_dtype);
      if (!any_gradient || coarseness(d) > coarseness(coarsest)) coarsest = d;
      any_gradient = true;
    }
  if (!any_gradient) {
    reject(directory, "/layers",
           "at least one layer held by some rank, but every rank file's "
           "/layers is empty");
  }
  for (RankFile& rank : ranks)
    if (!rank.manifest.objective.compute_dtype_given) rank.manifest.objective.compute_dtype = coarsest;

  std::map<int, std::vector<const RankFile*>> holders;
  for (const RankFile& rank : ranks)
    for (int l : rank.manifest.layers) holders[l].push_back(&rank);
  for (const auto& [l, layer_holders] : holders)
    capture.layers.push_back(LayerAssembler(l, layer_holders).run());
  requireSameTokenSets(capture.layers, ranks);

  capture.world_size = world_size;
  capture.manifest = ranks.front().manifest;
  for (RankFile& rank : ranks) {
    capture.rank_manifests.push_back(rank.manifest);
    capture.mappings.push_back(rank.view.mapping());
    // Every byte was checked and what is kept was converted: the mapping's pages go back until
    // readRows streams the inputs, so the capture is never resident twice (once here, once read).
    releaseResidentPages(rank.view.mapping().get(), rank.view.fileSize());
  }
  return capture;
}

}  // namespace moe
