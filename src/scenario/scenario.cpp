// The scenario layer: JSON text -> typed Scenario (defaults filled in, every rule checked) and back.
// Every problem with the input is an InputError naming the file, the JSON Pointer of the offending
// value and what was expected; nothing here aborts or exits.
#include "scenario/scenario.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <cerrno>
#include <climits>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>
#include <utility>

#include "common/errors.hpp"
#include "scenario/catalog.hpp"

namespace moe {
namespace {

using Json = nlohmann::json;
using OrderedJson = nlohmann::ordered_json;

// ---------------------------------------------------------------------------------------------
// Names shared by parsing, validation and output.

constexpr const char* kScoreNames[] = {"softmax", "sigmoid"};
constexpr const char* kAuxScopeNames[] = {"micro_batch", "sequence", "global_batch"};
constexpr const char* kZLossScopeNames[] = {"micro_batch", "global_batch"};
constexpr const char* kGroupWeightingNames[] = {"preset", "uniform", "tokens"};
constexpr const char* kDTypeNames[] = {"float64", "float32", "bfloat16"};
constexpr const char* kScheduleNames[] = {"gpipe", "1f1b", "interleaved_1f1b"};
constexpr const char* kCpLayoutNames[] = {"contiguous", "zigzag"};
const std::vector<std::string> kVerdictNames = {"pass", "fail"};
const std::vector<std::string> kDiagnosisCodes = {
    "AUX_GRAD_MISSING",    "AUX_GRAD_SCALED",    "AUX_GRAD_DIRECTION",      "AUX_COEFF_NONLINEAR",
    "MAIN_GRAD_MISMATCH",  "OBJECTIVE_NOT_INVARIANT", "FD_UNRELIABLE"};

// Size limits of DESIGN §6 validation (what one process can hold and finish in reasonable time).
constexpr int kMaxHidden = 16384;
constexpr int kMaxExperts = 4096;
constexpr int kMaxLayers = 512;
constexpr int kMaxFfn = 65536;
constexpr int kMaxBatch = 1 << 20;
constexpr int kMaxSeqLen = 1 << 20;
constexpr long long kMaxWorld = 1 << 16;
constexpr int kMaxMicrobatches = 1 << 16;
constexpr long long kMaxTokens = 1ll << 26;

// The keys each object may hold, in the order scenarioToJsonText writes them.
const std::vector<std::string> kTopLevelKeys = {
    "schema_version", "name",      "description", "seed",   "model",    "data",
    "aux",            "mesh",      "framework",   "faults", "expect",   "tolerance"};
const std::vector<std::string> kModelKeys = {"hidden", "experts", "top_k",          "layers",
                                             "ffn",    "score",   "norm_topk_prob", "dtype"};
const std::vector<std::string> kDataKeys = {"batch", "seq_len", "valid_lengths", "safetensors"};
const std::vector<std::string> kAuxKeys = {"type",         "coeff",           "z_loss_coeff",
                                           "z_loss_scope", "exclude_padding", "group_weighting"};
const std::vector<std::string> kMeshKeys = {"dp",       "pp",           "cp",
                                            "microbatches", "schedule", "virtual_stages",
                                            "cp_layout"};
const std::vector<std::string> kFrameworkKeys = {"preset"};
const std::vector<std::string> kExpectKeys = {"verdict", "diagnosis", "factor"};
const std::vector<std::string> kToleranceKeys = {"rtol"};

// "a, b, c" from a list of names.
template <typename Names>
std::string joinNames(const Names& names, const char* quote = "") {
  std::string out;
  for (const auto& n : names) {
    if (!out.empty()) out += ", ";
    out += quote;
    out += n;
    out += quote;
  }
  return out;
}

// One path segment escaped per RFC 6901 (~ -> ~0, / -> ~1).
std::string pointerSegment(const std::string& key) {
  std::string out;
  for (char c : key) {
    if (c == '~')
      out += "~0";
    else if (c == '/')
      out += "~1";
    else
      out += c;
  }
  return out;
}

std::string childPath(const std::string& parent, const std::string& key) {
  return parent + "/" + pointerSegment(key);
}
std::string childPath(const std::string& parent, std::size_t index) {
  return parent + "/" + std::to_string(index);
}

// Edit distance, for "did you mean" hints on misspelt keys and names.
std::size_t editDistance(const std::string& a, const std::string& b) {
  std::vector<std::size_t> row(b.size() + 1);
  for (std::size_t j = 0; j <= b.size(); ++j) row[j] = j;
  for (std::size_t i = 1; i <= a.size(); ++i) {
    std::size_t diagonal = row[0];
    row[0] = i;
    for (std::size_t j = 1; j <= b.size(); ++j) {
      const std::size_t above = row[j];
      row[j] = std::min({row[j] + 1, row[j - 1] + 1, diagonal + (a[i - 1] == b[j - 1] ? 0 : 1)});
      diagonal = above;
    }
  }
  return row[b.size()];
}

// " (did you mean "x"?)" when one candidate is close to `given`, else "".
std::string didYouMean(const std::string& given, const std::vector<std::string>& candidates) {
  std::string best;
  std::size_t best_distance = std::numeric_limits<std::size_t>::max();
  for (const auto& c : candidates) {
    const std::size_t d = editDistance(given, c);
    if (d < best_distance) {
      best_distance = d;
      best = c;
    }
  }
  // Close enough: about a quarter of the longer name, and well under the shorter one (so that
  // "tp" does not suggest "dp").
  const std::size_t longer = std::max(given.size(), best.size());
  const std::size_t shorter = std::min(given.size(), best.size());
  if (best.empty() || best_distance > std::max<std::size_t>(1, (longer + 2) / 4) ||
      2 * best_distance >= shorter)
    return "";
  return fmt::format(" (did you mean \"{}\"?)", best);
}

// A short rendering of a JSON value for "got ..." in messages.
std::string describe(const Json& value) {
  if (value.is_object()) return "an object";
  if (value.is_array()) return "an array";
  std::string text = value.dump(-1, ' ', false, Json::error_handler_t::replace);
  if (text.size() > 60) text = text.substr(0, 57) + "...";
  return text;
}

// Shortest text that reads back as the same double (for messages).
std::string numberText(double v) { return Json(v).dump(); }

// ---------------------------------------------------------------------------------------------
// JSON text -> Json, with syntax errors and duplicate keys reported by position / path.

// Line and column (1-based) of a byte offset in `text`.
std::pair<std::size_t, std::size_t> lineAndColumn(const std::string& text, std::size_t byte) {
  std::size_t line = 1, column = 1;
  for (std::size_t i = 0; i < byte && i < text.size(); ++i) {
    if (text[i] == '\n') {
      ++line;
      column = 1;
    } else {
      ++column;
    }
  }
  return {line, column};
}

// Tracks where the parser is (a JSON Pointer) so that a repeated key can be reported by path.
class DuplicateKeyGuard {
 public:
  explicit DuplicateKeyGuard(std::string file) : file_(std::move(file)) {}

  // The parser callback: throws InputError on a key seen twice in the same object; keeps all values.
  bool operator()(int /*depth*/, Json::parse_event_t event, Json& parsed) {
    switch (event) {
      case Json::parse_event_t::object_start:
        enterValue();
        frames_.push_back(Frame{false, {}, {}, 0});
        break;
      case Json::parse_event_t::array_start:
        enterValue();
        frames_.push_back(Frame{true, {}, {}, 0});
        break;
      case Json::parse_event_t::key: {
        Frame& frame = frames_.back();
        const std::string key = parsed.get<std::string>();
        frame.current_key = key;
        if (!frame.keys.insert(key).second)
          throw InputError(file_, currentPath(),
                           fmt::format("key \"{}\" appears twice in the same object", key));
        break;
      }
      case Json::parse_event_t::value:
        enterValue();
        break;
      case Json::parse_event_t::object_end:
      case Json::parse_event_t::array_end:
        frames_.pop_back();
        break;
    }
    return true;
  }

 private:
  struct Frame {
    bool is_array;
    std::set<std::string> keys;
    std::string current_key;
    std::size_t next_index;  // arrays: index of the next element
  };

  // A value starts inside the innermost container: arrays advance their element index.
  void enterValue() {
    if (!frames_.empty() && frames_.back().is_array) ++frames_.back().next_index;
  }

  std::string currentPath() const {
    std::string path;
    for (const Frame& f : frames_)
      path = f.is_array ? childPath(path, f.next_index - 1) : childPath(path, f.current_key);
    return path;
  }

  std::string file_;
  std::vector<Frame> frames_;
};

// Parses `text` as one JSON document. Throws InputError with line, column and byte of a syntax
// error, or with the path of a duplicated key.
Json parseJsonDocument(const std::string& text, const std::string& file) {
  try {
    return Json::parse(text, DuplicateKeyGuard(file), /*allow_exceptions=*/true,
                       /*ignore_comments=*/false);
  } catch (const Json::parse_error& e) {
    const auto [line, column] = lineAndColumn(text, e.byte > 0 ? e.byte - 1 : 0);
    std::string detail = e.what();
    const std::size_t at = detail.find("parse error");
    const std::size_t colon = at == std::string::npos ? std::string::npos : detail.find(": ", at);
    if (colon != std::string::npos) detail = detail.substr(colon + 2);
    throw InputError(file, "",
                     fmt::format("invalid JSON at line {}, column {} (byte {}): {}", line, column,
                                 e.byte, detail));
  }
}

// ---------------------------------------------------------------------------------------------
// Json -> Scenario: type checks per value.

class ScenarioReader {
 public:
  explicit ScenarioReader(std::string file) : file_(std::move(file)) {}

  // Fills `scenario` from the document; every absent optional key keeps its struct default.
  void read(const Json& root, Scenario& scenario) const {
    if (!root.is_object())
      throw InputError(file_, "",
                       fmt::format("expected a JSON object at the top level, got {}",
                                   describe(root)));
    rejectUnknownKeys(root, "", kTopLevelKeys);

    if (!root.contains("schema_version"))
      throw InputError(file_, "/schema_version",
                       "required key \"schema_version\" is missing; expected 1");
    scenario.schema_version = readInt(root["schema_version"], "/schema_version", 0);
    if (scenario.schema_version != 1)
      throw InputError(file_, "/schema_version",
                       fmt::format("unsupported schema_version {}; this tool reads schema_version 1",
                                   scenario.schema_version));

    if (!root.contains("name"))
      throw InputError(file_, "/name", "required key \"name\" is missing; expected a non-empty string");
    scenario.name = readString(root["name"], "/name");
    if (scenario.name.empty()) throw InputError(file_, "/name", "expected a non-empty string, got \"\"");

    if (root.contains("description"))
      scenario.description = readString(root["description"], "/description");
    if (root.contains("seed")) scenario.seed = readSeed(root["seed"], "/seed");

    if (const Json* model = section(root, "model")) readModel(*model, scenario.model);
    if (const Json* data = section(root, "data")) readData(*data, scenario.data);
    if (const Json* aux = section(root, "aux")) readAux(*aux, scenario.aux);
    if (const Json* mesh = section(root, "mesh")) readMesh(*mesh, scenario.mesh);
    if (const Json* framework = section(root, "framework")) {
      rejectUnknownKeys(*framework, "/framework", kFrameworkKeys);
      if (framework->contains("preset"))
        scenario.framework.preset = readString((*framework)["preset"], "/framework/preset");
    }
    if (root.contains("faults")) scenario.faults = readFaults(root["faults"], "/faults");
    if (const Json* expect = section(root, "expect")) readExpect(*expect, scenario.expect);
    if (const Json* tolerance = section(root, "tolerance")) {
      rejectUnknownKeys(*tolerance, "/tolerance", kToleranceKeys);
      if (tolerance->contains("rtol"))
        scenario.tolerance.rtol = readNumber((*tolerance)["rtol"], "/tolerance/rtol");
    }
  }

 private:
  // The object under `key`, or nullptr when absent; throws when present but not an object.
  const Json* section(const Json& parent, const std::string& key) const {
    if (!parent.contains(key)) return nullptr;
    const Json& value = parent[key];
    if (!value.is_object())
      throw InputError(file_, "/" + key, fmt::format("expected an object, got {}", describe(value)));
    return &value;
  }

  void rejectUnknownKeys(const Json& object, const std::string& path,
                         const std::vector<std::string>& allowed) const {
    for (const auto& item : object.items()) {
      if (std::find(allowed.begin(), allowed.end(), item.key()) != allowed.end()) continue;
      throw InputError(file_, childPath(path, item.key()),
                       fmt::format("unknown key \"{}\"{}; allowed keys{}: {}", item.key(),
                                   didYouMean(item.key(), allowed),
                                   path.empty() ? "" : " in " + path, joinNames(allowed)));
    }
  }

  // An integer in [min_value, INT_MAX]. Integral floats (2.0) are accepted, as JSON Schema does.
  int readInt(const Json& value, const std::string& path, int min_value) const {
    const std::string expected = fmt::format("expected an integer >= {}", min_value);
    long double number = 0;
    if (value.is_number_integer()) {  // signed and unsigned
      number = value.is_number_unsigned() ? static_cast<long double>(value.get<std::uint64_t>())
                                          : static_cast<long double>(value.get<std::int64_t>());
    } else if (value.is_number_float()) {
      const double d = value.get<double>();
      if (!std::isfinite(d) || std::floor(d) != d)
        throw InputError(file_, path, fmt::format("{}, got {}", expected, describe(value)));
      number = d;
    } else {
      throw InputError(file_, path, fmt::format("{}, got {}", expected, describe(value)));
    }
    if (number < min_value)
      throw InputError(file_, path, fmt::format("{}, got {}", expected, describe(value)));
    if (number > INT_MAX)
      throw InputError(file_, path,
                       fmt::format("{}, got {} (beyond the largest supported integer, {})",
                                   expected, describe(value), INT_MAX));
    return static_cast<int>(number);
  }

  // The seed: any integer in [0, 2^64 - 1].
  std::uint64_t readSeed(const Json& value, const std::string& path) const {
    const char* expected = "expected a non-negative integer";
    if (value.is_number_unsigned()) return value.get<std::uint64_t>();
    if (value.is_number_integer())
      throw InputError(file_, path, fmt::format("{}, got {}", expected, describe(value)));
    if (value.is_number_float()) {
      const double d = value.get<double>();
      if (std::floor(d) != d || d < 0)
        throw InputError(file_, path, fmt::format("{}, got {}", expected, describe(value)));
      if (d >= 18446744073709551616.0)
        throw InputError(file_, path,
                         fmt::format("{}, got {} (beyond 2^64 - 1)", expected, describe(value)));
      return static_cast<std::uint64_t>(d);
    }
    throw InputError(file_, path, fmt::format("{}, got {}", expected, describe(value)));
  }

  // A finite number >= 0.
  double readNumber(const Json& value, const std::string& path) const {
    if (!value.is_number() || !std::isfinite(value.get<double>()) || value.get<double>() < 0)
      throw InputError(file_, path,
                       fmt::format("expected a finite number >= 0, got {}", describe(value)));
    return value.get<double>();
  }

  bool readBool(const Json& value, const std::string& path) const {
    if (!value.is_boolean())
      throw InputError(file_, path, fmt::format("expected true or false, got {}", describe(value)));
    return value.get<bool>();
  }

  std::string readString(const Json& value, const std::string& path) const {
    if (!value.is_string())
      throw InputError(file_, path, fmt::format("expected a string, got {}", describe(value)));
    return value.get<std::string>();
  }

  // The index of `value` in `names`; throws naming every allowed value.
  template <std::size_t N>
  std::size_t readEnum(const Json& value, const std::string& path, const char* const (&names)[N]) const {
    const std::vector<std::string> allowed(std::begin(names), std::end(names));
    return readChoice(value, path, allowed);
  }

  std::size_t readChoice(const Json& value, const std::string& path,
                         const std::vector<std::string>& allowed) const {
    if (value.is_string()) {
      const std::string text = value.get<std::string>();
      for (std::size_t i = 0; i < allowed.size(); ++i)
        if (allowed[i] == text) return i;
      throw InputError(file_, path,
                       fmt::format("expected one of {}, got {}{}", joinNames(allowed, "\""),
                                   describe(value), didYouMean(text, allowed)));
    }
    throw InputError(file_, path,
                     fmt::format("expected one of {}, got {}", joinNames(allowed, "\""),
                                 describe(value)));
  }

  void readModel(const Json& model, ModelConfig& out) const {
    rejectUnknownKeys(model, "/model", kModelKeys);
    if (model.contains("hidden")) out.hidden = readInt(model["hidden"], "/model/hidden", 1);
    if (model.contains("experts")) out.experts = readInt(model["experts"], "/model/experts", 1);
    if (model.contains("top_k")) out.top_k = readInt(model["top_k"], "/model/top_k", 1);
    if (model.contains("layers")) out.layers = readInt(model["layers"], "/model/layers", 1);
    if (model.contains("ffn")) out.ffn = readInt(model["ffn"], "/model/ffn", 1);
    if (model.contains("score"))
      out.score = static_cast<ScoreFunction>(readEnum(model["score"], "/model/score", kScoreNames));
    if (model.contains("norm_topk_prob"))
      out.norm_topk_prob = readBool(model["norm_topk_prob"], "/model/norm_topk_prob");
    if (model.contains("dtype"))
      out.dtype = static_cast<DType>(readEnum(model["dtype"], "/model/dtype", kDTypeNames));
  }

  void readData(const Json& data, DataConfig& out) const {
    rejectUnknownKeys(data, "/data", kDataKeys);
    if (data.contains("batch")) out.batch = readInt(data["batch"], "/data/batch", 1);
    if (data.contains("seq_len")) out.seq_len = readInt(data["seq_len"], "/data/seq_len", 1);
    if (data.contains("valid_lengths")) {
      const Json& lengths = data["valid_lengths"];
      if (!lengths.is_array())
        throw InputError(file_, "/data/valid_lengths",
                         fmt::format("expected an array of {} integers in [0, seq_len], got {}",
                                     out.batch, describe(lengths)));
      out.valid_lengths.clear();
      for (std::size_t i = 0; i < lengths.size(); ++i)
        out.valid_lengths.push_back(readInt(lengths[i], childPath("/data/valid_lengths", i), 0));
    }
    if (data.contains("safetensors"))
      out.safetensors = readString(data["safetensors"], "/data/safetensors");
  }

  void readAux(const Json& aux, AuxConfig& out) const {
    rejectUnknownKeys(aux, "/aux", kAuxKeys);
    if (aux.contains("type"))
      out.type = static_cast<AuxScope>(readEnum(aux["type"], "/aux/type", kAuxScopeNames));
    if (aux.contains("coeff")) out.coeff = readNumber(aux["coeff"], "/aux/coeff");
    if (aux.contains("z_loss_coeff"))
      out.z_loss_coeff = readNumber(aux["z_loss_coeff"], "/aux/z_loss_coeff");
    if (aux.contains("z_loss_scope"))
      out.z_loss_scope = static_cast<ZLossScope>(
          readEnum(aux["z_loss_scope"], "/aux/z_loss_scope", kZLossScopeNames));
    if (aux.contains("exclude_padding"))
      out.exclude_padding = readBool(aux["exclude_padding"], "/aux/exclude_padding");
    if (aux.contains("group_weighting"))
      out.group_weighting = static_cast<GroupWeighting>(
          readEnum(aux["group_weighting"], "/aux/group_weighting", kGroupWeightingNames));
  }

  void readMesh(const Json& mesh, MeshConfig& out) const {
    rejectUnknownKeys(mesh, "/mesh", kMeshKeys);
    if (mesh.contains("dp")) out.dp = readInt(mesh["dp"], "/mesh/dp", 1);
    if (mesh.contains("pp")) out.pp = readInt(mesh["pp"], "/mesh/pp", 1);
    if (mesh.contains("cp")) out.cp = readInt(mesh["cp"], "/mesh/cp", 1);
    if (mesh.contains("microbatches"))
      out.microbatches = readInt(mesh["microbatches"], "/mesh/microbatches", 1);
    if (mesh.contains("schedule"))
      out.schedule =
          static_cast<Schedule>(readEnum(mesh["schedule"], "/mesh/schedule", kScheduleNames));
    if (mesh.contains("virtual_stages"))
      out.virtual_stages = readInt(mesh["virtual_stages"], "/mesh/virtual_stages", 1);
    if (mesh.contains("cp_layout"))
      out.cp_layout =
          static_cast<CpLayout>(readEnum(mesh["cp_layout"], "/mesh/cp_layout", kCpLayoutNames));
  }

  std::vector<std::string> readFaults(const Json& faults, const std::string& path) const {
    if (!faults.is_array())
      throw InputError(file_, path,
                       fmt::format("expected an array of fault names, got {}", describe(faults)));
    std::vector<std::string> names;
    for (std::size_t i = 0; i < faults.size(); ++i)
      names.push_back(readString(faults[i], childPath(path, i)));
    return names;  // names and uniqueness are checked by validateScenario
  }

  void readExpect(const Json& expect, Expectation& out) const {
    rejectUnknownKeys(expect, "/expect", kExpectKeys);
    if (expect.contains("verdict"))
      out.verdict = kVerdictNames[readChoice(expect["verdict"], "/expect/verdict", kVerdictNames)];
    if (expect.contains("diagnosis"))
      out.diagnosis = readString(expect["diagnosis"], "/expect/diagnosis");
    if (expect.contains("factor")) out.factor = readString(expect["factor"], "/expect/factor");
  }

  std::string file_;
};

// Fills what the file may leave out and the struct cannot default: one valid length per sequence.
void fillDefaults(Scenario& scenario) {
  if (scenario.data.valid_lengths.empty() && scenario.data.batch > 0)
    scenario.data.valid_lengths.assign(static_cast<std::size_t>(scenario.data.batch),
                                       scenario.data.seq_len);
}

// ---------------------------------------------------------------------------------------------
// Cross-field validation.

class ScenarioValidator {
 public:
  explicit ScenarioValidator(const Scenario& scenario)
      : scenario_(scenario), file_(scenario.source_file) {}

  // Throws InputError on the first rule the scenario breaks.
  void run() const {
    const ModelConfig& model = scenario_.model;
    const DataConfig& data = scenario_.data;
    const MeshConfig& mesh = scenario_.mesh;

    if (scenario_.schema_version != 1)
      fail("/schema_version", fmt::format("unsupported schema_version {}; this tool reads "
                                          "schema_version 1",
                                          scenario_.schema_version));

    // Each size on its own: positive and bounded.
    requireInRange("/model/hidden", "hidden", model.hidden, 1, kMaxHidden);
    requireInRange("/model/experts", "experts", model.experts, 1, kMaxExperts);
    requireInRange("/model/top_k", "top_k", model.top_k, 1, kMaxExperts);
    requireInRange("/model/layers", "layers", model.layers, 1, kMaxLayers);
    requireInRange("/model/ffn", "ffn", model.ffn, 1, kMaxFfn);
    requireInRange("/data/batch", "batch", data.batch, 1, kMaxBatch);
    requireInRange("/data/seq_len", "seq_len", data.seq_len, 1, kMaxSeqLen);
    requireInRange("/mesh/dp", "dp", mesh.dp, 1, static_cast<int>(kMaxWorld));
    requireInRange("/mesh/pp", "pp", mesh.pp, 1, static_cast<int>(kMaxWorld));
    requireInRange("/mesh/cp", "cp", mesh.cp, 1, static_cast<int>(kMaxWorld));
    requireInRange("/mesh/microbatches", "microbatches", mesh.microbatches, 1, kMaxMicrobatches);
    requireInRange("/mesh/virtual_stages", "virtual_stages", mesh.virtual_stages, 1, kMaxLayers);

    const long long world = 1ll * mesh.dp * mesh.pp * mesh.cp;
    if (world > kMaxWorld)
      fail("/mesh", fmt::format("world size dp*pp*cp ({}*{}*{} = {}) must be <= {}", mesh.dp,
                                mesh.pp, mesh.cp, world, kMaxWorld));
    const long long tokens = 1ll * data.batch * data.seq_len;
    if (tokens > kMaxTokens)
      fail("/data", fmt::format("batch*seq_len ({}*{} = {} tokens) must be <= {}", data.batch,
                                data.seq_len, tokens, kMaxTokens));

    // Cross-field rules.
    if (model.top_k > model.experts)
      fail("/model/top_k",
           fmt::format("top_k ({}) must be <= experts ({})", model.top_k, model.experts));

    const long long batch_split = 1ll * mesh.dp * mesh.microbatches;
    if (data.batch % batch_split != 0)
      fail("/data/batch",
           fmt::format("batch ({}) must be divisible by dp*microbatches ({}*{} = {}): every "
                       "microbatch of every DP replica holds the same number of sequences",
                       data.batch, mesh.dp, mesh.microbatches, batch_split));

    if (mesh.cp_layout == CpLayout::kZigzag) {
      if (data.seq_len % (2 * mesh.cp) != 0)
        fail("/data/seq_len",
             fmt::format("seq_len ({}) must be divisible by 2*cp ({}) with cp_layout \"zigzag\"",
                         data.seq_len, 2 * mesh.cp));
    } else if (data.seq_len % mesh.cp != 0) {
      fail("/data/seq_len",
           fmt::format("seq_len ({}) must be divisible by cp ({})", data.seq_len, mesh.cp));
    }

    const long long model_chunks = 1ll * mesh.pp * mesh.virtual_stages;
    if (model.layers % model_chunks != 0)
      fail("/model/layers",
           fmt::format("layers ({}) must be divisible by pp*virtual_stages ({}*{} = {})",
                       model.layers, mesh.pp, mesh.virtual_stages, model_chunks));

    if (mesh.virtual_stages > 1 && mesh.schedule != Schedule::kInterleaved1F1B)
      fail("/mesh/virtual_stages",
           fmt::format("virtual_stages ({}) > 1 needs schedule \"interleaved_1f1b\", got \"{}\"",
                       mesh.virtual_stages, toString(mesh.schedule)));
    if (mesh.schedule == Schedule::kInterleaved1F1B && mesh.microbatches % mesh.pp != 0)
      fail("/mesh/microbatches",
           fmt::format("schedule \"interleaved_1f1b\" needs microbatches ({}) divisible by pp ({})",
                       mesh.microbatches, mesh.pp));

    validateValidLengths();
    validateCoefficients();
    validateNames();

    const std::uint64_t bytes = estimateMemoryBytes(scenario_);
    if (bytes > kMaxScenarioBytes)
      fail("", fmt::format("estimated memory {:.2f} GiB exceeds the limit of {:.0f} GiB; reduce "
                           "batch, seq_len, hidden, experts, ffn or layers",
                           static_cast<double>(bytes) / (1ull << 30),
                           static_cast<double>(kMaxScenarioBytes) / (1ull << 30)));
  }

 private:
  [[noreturn]] void fail(const std::string& path, const std::string& what) const {
    throw InputError(file_, path, what);
  }

  void requireInRange(const std::string& path, const char* name, int value, int min_value,
                      int max_value) const {
    if (value < min_value)
      fail(path, fmt::format("expected an integer >= {}, got {}", min_value, value));
    if (value > max_value) fail(path, fmt::format("{} ({}) must be <= {}", name, value, max_value));
  }

  // One entry per sequence, each in [0, seq_len]; an empty vector means "all full" (what the data
  // generator reads), so structs built in code need not fill it.
  void validateValidLengths() const {
    const DataConfig& data = scenario_.data;
    const auto& lengths = data.valid_lengths;
    if (lengths.empty()) return;
    if (lengths.size() != static_cast<std::size_t>(data.batch))
      fail("/data/valid_lengths",
           fmt::format("expected {} entries (one per sequence, batch = {}), got {}", data.batch,
                       data.batch, lengths.size()));
    long long total = 0;
    for (std::size_t i = 0; i < lengths.size(); ++i) {
      if (lengths[i] < 0 || lengths[i] > data.seq_len)
        fail(childPath("/data/valid_lengths", i),
             fmt::format("valid length {} must be in [0, seq_len = {}]", lengths[i], data.seq_len));
      total += lengths[i];
    }
    if (total == 0 && scenario_.aux.exclude_padding)
      fail("/data/valid_lengths",
           "every token is padding: at least one sequence needs a valid length > 0");
  }

  void validateCoefficients() const {
    const auto requireNonNegative = [&](const char* path, const char* name, double value) {
      if (!std::isfinite(value) || value < 0)
        fail(path, fmt::format("{} ({}) must be a finite number >= 0", name, numberText(value)));
    };
    requireNonNegative("/aux/coeff", "coeff", scenario_.aux.coeff);
    requireNonNegative("/aux/z_loss_coeff", "z_loss_coeff", scenario_.aux.z_loss_coeff);
    const double rtol = scenario_.tolerance.rtol;
    if (!std::isfinite(rtol) || rtol < 0 || rtol >= 1)
      fail("/tolerance/rtol",
           fmt::format("rtol ({}) must be a finite number in [0, 1) (0 = derived from the dtype)",
                       numberText(rtol)));
  }

  // Catalog names (preset, faults) and the expectation's enumerations.
  void validateNames() const {
    std::vector<std::string> presets;
    for (const auto& p : presetCatalog()) presets.push_back(p.name);
    if (!findPreset(scenario_.framework.preset))
      fail("/framework/preset",
           fmt::format("unknown preset \"{}\"{}; known presets: {}", scenario_.framework.preset,
                       didYouMean(scenario_.framework.preset, presets), joinNames(presets)));

    std::vector<std::string> faults;
    for (const auto& f : faultCatalog()) faults.push_back(f.name);
    for (std::size_t i = 0; i < scenario_.faults.size(); ++i) {
      const std::string& name = scenario_.faults[i];
      if (!findFault(name))
        fail(childPath("/faults", i),
             fmt::format("unknown fault \"{}\"{}; known faults: {}", name, didYouMean(name, faults),
                         joinNames(faults)));
      for (std::size_t j = 0; j < i; ++j)
        if (scenario_.faults[j] == name)
          fail(childPath("/faults", i),
               fmt::format("fault \"{}\" is listed twice (first at /faults/{})", name, j));
    }

    const Expectation& expect = scenario_.expect;
    if (std::find(kVerdictNames.begin(), kVerdictNames.end(), expect.verdict) == kVerdictNames.end())
      fail("/expect/verdict",
           fmt::format("expected one of {}, got \"{}\"", joinNames(kVerdictNames, "\""),
                       expect.verdict));
    if (!expect.diagnosis.empty() &&
        std::find(kDiagnosisCodes.begin(), kDiagnosisCodes.end(), expect.diagnosis) ==
            kDiagnosisCodes.end())
      fail("/expect/diagnosis",
           fmt::format("unknown diagnosis code \"{}\"{}; expected \"\" (any) or one of {}",
                       expect.diagnosis, didYouMean(expect.diagnosis, kDiagnosisCodes),
                       joinNames(kDiagnosisCodes)));
  }

  const Scenario& scenario_;
  const std::string& file_;
};

}  // namespace

// ---------------------------------------------------------------------------------------------
// Public API.

Scenario parseScenarioText(const std::string& text, const std::string& file_for_errors) {
  const Json root = parseJsonDocument(text, file_for_errors);
  Scenario scenario;
  scenario.source_file = file_for_errors;
  ScenarioReader(file_for_errors).read(root, scenario);
  fillDefaults(scenario);
  validateScenario(scenario);
  return scenario;
}

Scenario loadScenarioFile(const std::string& path) {
  std::error_code ec;
  if (std::filesystem::is_directory(path, ec))
    throw InputError(path, "", "cannot read file: it is a directory");
  std::ifstream in(path, std::ios::binary);
  if (!in) throw InputError(path, "", fmt::format("cannot read file: {}", std::strerror(errno)));
  std::ostringstream content;
  content << in.rdbuf();
  if (in.bad()) throw InputError(path, "", fmt::format("cannot read file: {}", std::strerror(errno)));
  return parseScenarioText(content.str(), path);
}

void validateScenario(const Scenario& scenario) { ScenarioValidator(scenario).run(); }

std::string scenarioToJsonText(const Scenario& scenario, int indent) {
  OrderedJson out;
  out["schema_version"] = scenario.schema_version;
  out["name"] = scenario.name;
  out["description"] = scenario.description;
  out["seed"] = scenario.seed;

  const ModelConfig& model = scenario.model;
  out["model"] = OrderedJson{{"hidden", model.hidden},
                             {"experts", model.experts},
                             {"top_k", model.top_k},
                             {"layers", model.layers},
                             {"ffn", model.ffn},
                             {"score", toString(model.score)},
                             {"norm_topk_prob", model.norm_topk_prob},
                             {"dtype", toString(model.dtype)}};

  const DataConfig& data = scenario.data;
  std::vector<int> lengths = data.valid_lengths;
  if (lengths.empty() && data.batch > 0) lengths.assign(static_cast<std::size_t>(data.batch), data.seq_len);
  out["data"] = OrderedJson{{"batch", data.batch},
                            {"seq_len", data.seq_len},
                            {"valid_lengths", lengths},
                            {"safetensors", data.safetensors}};

  const AuxConfig& aux = scenario.aux;
  out["aux"] = OrderedJson{{"type", toString(aux.type)},
                           {"coeff", aux.coeff},
                           {"z_loss_coeff", aux.z_loss_coeff},
                           {"z_loss_scope", toString(aux.z_loss_scope)},
                           {"exclude_padding", aux.exclude_padding},
                           {"group_weighting", toString(aux.group_weighting)}};

  const MeshConfig& mesh = scenario.mesh;
  out["mesh"] = OrderedJson{{"dp", mesh.dp},
                            {"pp", mesh.pp},
                            {"cp", mesh.cp},
                            {"microbatches", mesh.microbatches},
                            {"schedule", toString(mesh.schedule)},
                            {"virtual_stages", mesh.virtual_stages},
                            {"cp_layout", toString(mesh.cp_layout)}};

  out["framework"] = OrderedJson{{"preset", scenario.framework.preset}};
  out["faults"] = scenario.faults;
  out["expect"] = OrderedJson{{"verdict", scenario.expect.verdict},
                              {"diagnosis", scenario.expect.diagnosis},
                              {"factor", scenario.expect.factor}};
  out["tolerance"] = OrderedJson{{"rtol", scenario.tolerance.rtol}};
  return out.dump(indent, ' ', false, OrderedJson::error_handler_t::replace);
}

std::uint64_t estimateMemoryBytes(const Scenario& scenario) {
  // In double so that no product can overflow, whatever the (possibly unvalidated) sizes.
  const auto dim = [](int v) { return v > 0 ? static_cast<double>(v) : 0.0; };
  const double B = dim(scenario.data.batch), S = dim(scenario.data.seq_len);
  const double H = dim(scenario.model.hidden), E = dim(scenario.model.experts);
  const double L = dim(scenario.model.layers), F = dim(scenario.model.ffn);
  const double inputs_and_targets = 2.0 * B * S * H;
  const double activations = 3.0 * L * B * S * (2.0 * H + E);  // x3 for autograd buffers
  const double weights = L * (H * E + 2.0 * E * H * F);
  const double bytes = 8.0 * (inputs_and_targets + activations + weights);
  if (bytes >= 18446744073709551615.0) return std::numeric_limits<std::uint64_t>::max();
  return static_cast<std::uint64_t>(bytes);
}

double defaultRtol(DType dtype) {
  switch (dtype) {
    case DType::kFloat64: return 1e-7;
    case DType::kFloat32: return 1e-4;
    case DType::kBFloat16: return 2e-1;  // 8 significant bits (eps 7.8e-3); ~10 eps accumulate per element
  }
  return 1e-7;
}

namespace {
// The JSON name of an enumerator; "invalid" for a value outside the enumeration (never UB).
template <typename Enum, std::size_t N>
const char* enumName(Enum value, const char* const (&names)[N]) {
  const auto index = static_cast<std::size_t>(value);
  return index < N ? names[index] : "invalid";
}
}  // namespace

const char* toString(ScoreFunction v) { return enumName(v, kScoreNames); }
const char* toString(AuxScope v) { return enumName(v, kAuxScopeNames); }
const char* toString(ZLossScope v) { return enumName(v, kZLossScopeNames); }
const char* toString(GroupWeighting v) { return enumName(v, kGroupWeightingNames); }
const char* toString(DType v) { return enumName(v, kDTypeNames); }
const char* toString(Schedule v) { return enumName(v, kScheduleNames); }
const char* toString(CpLayout v) { return enumName(v, kCpLayoutNames); }
const char* toString(MainLossScope v) {
  return v == MainLossScope::kTokenMean ? "token_mean" : "microbatch_mean";
}

DType parseDType(const std::string& name) {
  for (int i = 0; i < 3; ++i)
    if (name == kDTypeNames[i]) return static_cast<DType>(i);
  throw UsageError(fmt::format("unknown dtype \"{}\"; expected one of float64, float32, bfloat16",
                               name));
}

}  // namespace moe
