#include "capture/capture_manifest.hpp"

#include <algorithm>
#include <climits>
#include <cmath>
#include <filesystem>
#include <vector>

#include <nlohmann/json.hpp>

#include "common/errors.hpp"
#include "common/json_input.hpp"
#include "data/safetensors.hpp"

namespace moe {
namespace {

using Json = nlohmann::json;
using OrderedJson = nlohmann::ordered_json;

// The keys each object of the manifest may hold, in the order the writer emits them.
const std::vector<std::string> kTopLevelKeys = {
    "schema_version",  "rank",      "world_size", "mesh",
    "layers",          "seq_len",   "objective",  "router_inputs_detached",
    "main_loss_scale", "framework", "created_by"};
const std::vector<std::string> kMeshKeys = {"dp", "dp_size", "cp", "cp_size", "pp",          "pp_size",
                                            "tp", "tp_size", "ep", "ep_size", "microbatches"};
const std::vector<std::string> kObjectiveKeys = {
    "aux_type", "coeff",          "z_loss_coeff",    "z_loss_scope",    "top_k",
    "score",    "norm_topk_prob", "exclude_padding", "group_weighting", "compute_dtype"};

const std::vector<AuxScope> kAuxScopes = {AuxScope::kMicroBatch, AuxScope::kSequence, AuxScope::kGlobalBatch};
const std::vector<ZLossScope> kZLossScopes = {ZLossScope::kMicroBatch, ZLossScope::kGlobalBatch};
const std::vector<ScoreFunction> kScores = {ScoreFunction::kSoftmax, ScoreFunction::kSigmoid};
// "preset" is a simulation notion: a real job's weighting is one of these two.
const std::vector<GroupWeighting> kGroupWeightings = {GroupWeighting::kUniform, GroupWeighting::kTokens};
const std::vector<DType> kComputeDTypes = {DType::kFloat64, DType::kFloat32, DType::kBFloat16};

std::string childPath(const std::string& parent, const std::string& key) {
  return parent + "/" + json_input::jsonPointerSegment(key);
}

class ManifestReader {
 public:
  explicit ManifestReader(std::string file) : file_(std::move(file)) {}

  CaptureManifest read(const Json& root, int file_rank) const {
    if (!root.is_object()) fail("", "a JSON object as the manifest, got " + json_input::describe(root));
    rejectUnknownKeys(root, "", kTopLevelKeys);
    CaptureManifest m;

    m.schema_version = readInt(required(root, "", "schema_version", "1"), "/schema_version", 0, INT_MAX);
    if (m.schema_version != 1) {
      fail("/schema_version",
           "schema_version 1 (the capture format this tool reads), got " + std::to_string(m.schema_version));
    }
    m.world_size = readInt(required(root, "", "world_size", "an integer >= 1"), "/world_size", 1, INT_MAX);
    m.rank = readInt(required(root, "", "rank", "an integer in [0, world_size)"), "/rank", 0,
                     m.world_size - 1, "world_size = " + std::to_string(m.world_size));
    if (file_rank >= 0 && m.rank != file_rank) {
      fail("/rank", std::to_string(file_rank) + ", the R of the file name rank" + std::to_string(file_rank) +
                        ".safetensors, got " + std::to_string(m.rank));
    }
    readMesh(requiredObject(root, "", "mesh"), m.mesh);
    const long long product = 1ll * m.mesh.dp_size * m.mesh.cp_size;
    long long world = 0;
    if (__builtin_mul_overflow(product, 1ll * m.mesh.pp_size * m.mesh.tp_size, &world) ||
        world != m.world_size) {
      fail("/world_size", "dp_size * cp_size * pp_size * tp_size = " + std::to_string(m.mesh.dp_size) +
                              " * " + std::to_string(m.mesh.cp_size) + " * " +
                              std::to_string(m.mesh.pp_size) + " * " + std::to_string(m.mesh.tp_size) +
                              " (ep is carved out of these ranks), got " + std::to_string(m.world_size));
    }
    readLayers(required(root, "", "layers", "an array of distinct layer indices >= 0"), m.layers);
    m.seq_len = readInt(required(root, "", "seq_len", "an integer >= 1"), "/seq_len", 1, INT_MAX);
    readObjective(requiredObject(root, "", "objective"), m.objective);

    m.router_inputs_detached =
        readBool(required(root, "", "router_inputs_detached", "true"), "/router_inputs_detached");
    if (!m.router_inputs_detached) {
      fail("/router_inputs_detached",
           "true (the router inputs detached, so that each layer's gradient depends on that layer alone; a "
           "gradient with cross-layer terms cannot be checked against a layer-local reference), got false");
    }
    m.main_loss_scale = readFinite(required(root, "", "main_loss_scale", "0"), "/main_loss_scale");
    if (m.main_loss_scale != 0.0) {
      fail("/main_loss_scale",
           "0 (the main loss multiplied by 0 before backward, so that the gradient is the aux part alone), "
           "got " +
               json_input::describe(root["main_loss_scale"]));
    }
    if (root.contains("framework")) m.framework = readString(root["framework"], "/framework");
    if (root.contains("created_by")) m.created_by = readString(root["created_by"], "/created_by");
    return m;
  }

 private:
  [[noreturn]] void fail(const std::string& path, const std::string& what) const {
    throw InputError(file_, path, "expected " + what);
  }

  void rejectUnknownKeys(const Json& object, const std::string& path,
                         const std::vector<std::string>& allowed) const {
    for (const auto& item : object.items()) {
      if (std::find(allowed.begin(), allowed.end(), item.key()) != allowed.end()) continue;
      throw InputError(file_, childPath(path, item.key()),
                       "unknown key \"" + item.key() + "\"" + json_input::didYouMean(item.key(), allowed) +
                           "; allowed keys" + (path.empty() ? std::string() : " in " + path) + ": " +
                           json_input::joinNames(allowed));
    }
  }

  const Json& required(const Json& object, const std::string& path, const std::string& key,
                       const std::string& expected) const {
    if (!object.contains(key)) {
      fail(childPath(path, key), expected + " (required key \"" + key + "\"), missing");
    }
    return object[key];
  }

  const Json& requiredObject(const Json& object, const std::string& path, const std::string& key) const {
    const Json& value = required(object, path, key, "an object");
    if (!value.is_object()) fail(childPath(path, key), "an object, got " + json_input::describe(value));
    return value;
  }

  // An integer in [min_value, max_value] (`bound` explains the upper bound). Integral floats (2.0)
  // are integers, as in JSON Schema and the scenario files.
  int readInt(const Json& value, const std::string& path, int min_value, int max_value,
              const std::string& bound = "") const {
    const std::string expected = max_value == INT_MAX
                                     ? "an integer >= " + std::to_string(min_value)
                                     : "an integer in [" + std::to_string(min_value) + ", " +
                                           (bound.empty() ? std::to_string(max_value + 1ll) : bound) + ")";
    long double number = 0;
    if (value.is_number_unsigned()) {
      number = static_cast<long double>(value.get<std::uint64_t>());
    } else if (value.is_number_integer()) {
      number = static_cast<long double>(value.get<std::int64_t>());
    } else if (value.is_number_float() && std::isfinite(value.get<double>()) &&
               std::floor(value.get<double>()) == value.get<double>()) {
      number = value.get<double>();
    } else {
      fail(path, expected + ", got " + json_input::describe(value));
    }
    if (number < min_value || number > max_value) fail(path, expected + ", got " + json_input::describe(value));
    return static_cast<int>(number);
  }

  double readFinite(const Json& value, const std::string& path) const {
    if (!value.is_number() || !std::isfinite(value.get<double>())) {
      fail(path, "a finite number, got " + json_input::describe(value));
    }
    return value.get<double>();
  }

  double readNonNegative(const Json& value, const std::string& path) const {
    if (!value.is_number() || !std::isfinite(value.get<double>()) || value.get<double>() < 0) {
      fail(path, "a finite number >= 0, got " + json_input::describe(value));
    }
    return value.get<double>();
  }

  bool readBool(const Json& value, const std::string& path) const {
    if (!value.is_boolean()) fail(path, "true or false, got " + json_input::describe(value));
    return value.get<bool>();
  }

  std::string readString(const Json& value, const std::string& path) const {
    if (!value.is_string() || json_input::nonFiniteLiteral(value)) fail(path, "a string, got " + json_input::describe(value));
    return value.get<std::string>();
  }

  template <typename Enum>
  Enum readEnum(const Json& value, const std::string& path, const std::vector<Enum>& choices) const {
    std::vector<std::string> names;
    for (Enum choice : choices) names.push_back(std::string("\"") + toString(choice) + "\"");
    if (value.is_string() && !json_input::nonFiniteLiteral(value)) {
      const std::string text = value.get<std::string>();
      std::vector<std::string> bare;
      for (Enum choice : choices) {
        if (text == toString(choice)) return choice;
        bare.push_back(toString(choice));
      }
      fail(path, "one of " + json_input::joinNames(names) + ", got " + json_input::describe(value) + json_input::didYouMean(text, bare));
    }
    fail(path, "one of " + json_input::joinNames(names) + ", got " + json_input::describe(value));
  }

  void readMesh(const Json& mesh, CaptureMesh& out) const {
    rejectUnknownKeys(mesh, "/mesh", kMeshKeys);
    // Sizes first: each coordinate's range depends on its size.
    const auto size = [&](const char* key, bool is_required, int fallback) {
      if (!is_required && !mesh.contains(key)) return fallback;
      return readInt(required(mesh, "/mesh", key, "an integer >= 1"), childPath("/mesh", key), 1, INT_MAX);
    };
    const auto coordinate = [&](const char* key, const char* size_key, int size_value, bool is_required) {
      if (!is_required && !mesh.contains(key)) return 0;
      return readInt(required(mesh, "/mesh", key, "an integer in [0, " + std::string(size_key) + ")"),
                     childPath("/mesh", key), 0, size_value - 1,
                     std::string(size_key) + " = " + std::to_string(size_value));
    };
    out.dp_size = size("dp_size", true, 1);
    out.cp_size = size("cp_size", true, 1);
    out.pp_size = size("pp_size", true, 1);
    out.tp_size = size("tp_size", false, 1);
    out.ep_size = size("ep_size", false, 1);
    out.dp = coordinate("dp", "dp_size", out.dp_size, true);
    out.cp = coordinate("cp", "cp_size", out.cp_size, true);
    out.pp = coordinate("pp", "pp_size", out.pp_size, true);
    out.tp = coordinate("tp", "tp_size", out.tp_size, false);
    out.ep = coordinate("ep", "ep_size", out.ep_size, false);
    out.microbatches =
        readInt(required(mesh, "/mesh", "microbatches", "an integer >= 1"), "/mesh/microbatches", 1, INT_MAX);
  }

  void readLayers(const Json& layers, std::vector<int>& out) const {
    if (!layers.is_array())
      fail("/layers", "an array of distinct layer indices >= 0, got " + json_input::describe(layers));
    for (std::size_t i = 0; i < layers.size(); ++i) {
      const std::string path = "/layers/" + std::to_string(i);
      const int layer = readInt(layers[i], path, 0, INT_MAX);
      if (std::find(out.begin(), out.end(), layer) != out.end()) {
        fail(path, "distinct layer indices, got layer " + std::to_string(layer) + " twice");
      }
      out.push_back(layer);
    }
    std::sort(out.begin(), out.end());
  }

  void readObjective(const Json& objective, CaptureObjective& out) const {
    const std::string o = "/objective";
    rejectUnknownKeys(objective, o, kObjectiveKeys);
    out.aux_scope =
        readEnum(required(objective, o, "aux_type", "one of \"micro_batch\", \"sequence\", \"global_batch\""),
                 o + "/aux_type", kAuxScopes);
    out.aux_coeff = readNonNegative(required(objective, o, "coeff", "a finite number >= 0"), o + "/coeff");
    out.top_k = readInt(required(objective, o, "top_k", "an integer >= 1"), o + "/top_k", 1, INT_MAX);
    out.score =
        readEnum(required(objective, o, "score", "one of \"softmax\", \"sigmoid\""), o + "/score", kScores);
    if (objective.contains("z_loss_coeff"))
      out.z_coeff = readNonNegative(objective["z_loss_coeff"], o + "/z_loss_coeff");
    if (objective.contains("z_loss_scope"))
      out.z_scope = readEnum(objective["z_loss_scope"], o + "/z_loss_scope", kZLossScopes);
    if (objective.contains("norm_topk_prob"))
      out.norm_topk_prob = readBool(objective["norm_topk_prob"], o + "/norm_topk_prob");
    if (objective.contains("exclude_padding"))
      out.exclude_padding = readBool(objective["exclude_padding"], o + "/exclude_padding");
    if (objective.contains("group_weighting"))
      out.group_weighting = readEnum(objective["group_weighting"], o + "/group_weighting", kGroupWeightings);
    if (objective.contains("compute_dtype")) {
      out.compute_dtype = readEnum(objective["compute_dtype"], o + "/compute_dtype", kComputeDTypes);
      out.compute_dtype_given = true;
    }
  }

  std::string file_;
};

}  // namespace

CaptureManifest parseCaptureManifest(const std::string& text, const std::string& file, int file_rank) {
  const Json root = json_input::parseJsonStrict(text, file, std::string("/__metadata__/") + kCaptureManifestKey,
                                    "the capture manifest, one JSON object", /*mark_non_finite=*/true);
  return ManifestReader(file).read(root, file_rank);
}

CaptureManifest readCaptureManifest(const SafetensorsView& file, int file_rank) {
  const std::string metadata_path = std::string("/__metadata__/") + kCaptureManifestKey;
  for (const auto& [key, value] : file.metadata()) {
    if (key != kCaptureManifestKey) {
      throw InputError(file.path(), "/__metadata__/" + json_input::jsonPointerSegment(key),
                       std::string("expected only the key \"") + kCaptureManifestKey +
                           "\" in __metadata__, got \"" + key + "\"");
    }
  }
  const auto it = file.metadata().find(kCaptureManifestKey);
  if (it == file.metadata().end()) {
    throw InputError(file.path(), metadata_path,
                     std::string("expected the capture manifest (a JSON object) under __metadata__ key \"") +
                         kCaptureManifestKey + "\", missing");
  }
  return parseCaptureManifest(it->second, file.path(), file_rank);
}

std::string captureManifestToJson(const CaptureManifest& m) {
  OrderedJson mesh = OrderedJson::object();
  const CaptureMesh& g = m.mesh;
  const int mesh_values[] = {g.dp, g.dp_size, g.cp, g.cp_size, g.pp,          g.pp_size,
                             g.tp, g.tp_size, g.ep, g.ep_size, g.microbatches};
  for (std::size_t i = 0; i < kMeshKeys.size(); ++i) mesh[kMeshKeys[i]] = mesh_values[i];

  const CaptureObjective& o = m.objective;
  OrderedJson objective = OrderedJson::object();
  objective["aux_type"] = toString(o.aux_scope);
  objective["coeff"] = o.aux_coeff;
  objective["z_loss_coeff"] = o.z_coeff;
  objective["z_loss_scope"] = toString(o.z_scope);
  objective["top_k"] = o.top_k;
  objective["score"] = toString(o.score);
  objective["norm_topk_prob"] = o.norm_topk_prob;
  objective["exclude_padding"] = o.exclude_padding;
  objective["group_weighting"] = toString(o.group_weighting);
  if (o.compute_dtype_given) objective["compute_dtype"] = toString(o.compute_dtype);

  OrderedJson root = OrderedJson::object();
  root["schema_version"] = m.schema_version;
  root["rank"] = m.rank;
  root["world_size"] = m.world_size;
  root["mesh"] = mesh;
  root["layers"] = m.layers;
  root["seq_len"] = m.seq_len;
  root["objective"] = objective;
  root["router_inputs_detached"] = m.router_inputs_detached;
  root["main_loss_scale"] = m.main_loss_scale;
  root["framework"] = m.framework;
  root["created_by"] = m.created_by;
  // Every key the reader knows is written (compute_dtype aside, see the header): the lists agree.
  return root.dump(-1, ' ', false, OrderedJson::error_handler_t::replace);
}

}  // namespace moe
