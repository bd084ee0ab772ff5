// The scenario layer: JSON text -> typed Scenario (defaults filled in, every rule checked) and back.
// Every field is described once, in the tables of scenarioFields() below: reading (with its type
// check), unknown-key rejection, the range check (also run on structs changed by command-line
// overrides), default filling and writing all walk the same descriptors. Cross-field rules are
// hand-written in ScenarioValidator. Every problem with the input is an InputError naming the
// file, the JSON Pointer of the offending value and what was expected; nothing here aborts.
#include "scenario/scenario.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <cerrno>
#include <climits>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <limits>
#include <nlohmann/json.hpp>
#include <sstream>
#include <utility>

#include "common/errors.hpp"
#include "common/json_input.hpp"
#include "scenario/catalog.hpp"

namespace moe {
namespace {

using Json = nlohmann::json;
using OrderedJson = nlohmann::ordered_json;
using json_input::childPath;
using json_input::describe;
using json_input::didYouMean;
using json_input::joinNames;
using json_input::numberText;

// ---------------------------------------------------------------------------------------------
// One {value, name} table per enumeration: toString, the readers and the writer use it.

template <class E>
struct EnumName {
  E value;
  const char* name;
};

constexpr EnumName<ScoreFunction> kScoreNames[] = {{ScoreFunction::kSoftmax, "softmax"},
                                                   {ScoreFunction::kSigmoid, "sigmoid"}};
constexpr EnumName<AuxScope> kAuxScopeNames[] = {{AuxScope::kMicroBatch, "micro_batch"},
                                                 {AuxScope::kSequence, "sequence"},
                                                 {AuxScope::kGlobalBatch, "global_batch"}};
constexpr EnumName<ZLossScope> kZLossScopeNames[] = {{ZLossScope::kMicroBatch, "micro_batch"},
                                                     {ZLossScope::kGlobalBatch, "global_batch"}};
constexpr EnumName<GroupWeighting> kGroupWeightingNames[] = {{GroupWeighting::kPreset, "preset"},
                                                             {GroupWeighting::kUniform, "uniform"},
                                                             {GroupWeighting::kTokens, "tokens"}};
constexpr EnumName<DType> kDTypeNames[] = {
    {DType::kFloat64, "float64"}, {DType::kFloat32, "float32"}, {DType::kBFloat16, "bfloat16"}};
constexpr EnumName<Schedule> kScheduleNames[] = {{Schedule::kGPipe, "gpipe"},
                                                 {Schedule::kOneFOneB, "1f1b"},
                                                 {Schedule::kInterleaved1F1B, "interleaved_1f1b"}};
constexpr EnumName<CpLayout> kCpLayoutNames[] = {{CpLayout::kContiguous, "contiguous"},
                                                 {CpLayout::kZigzag, "zigzag"}};
constexpr EnumName<Verdict> kVerdictNames[] = {{Verdict::kPass, "pass"}, {Verdict::kFail, "fail"}};
constexpr EnumName<MainLossScope> kMainLossScopeNames[] = {
    {MainLossScope::kMicrobatchMean, "microbatch_mean"}, {MainLossScope::kTokenMean, "token_mean"}};

template <class E, std::size_t N>
const char* nameOf(E value, const EnumName<E> (&table)[N]) {
  for (const auto& entry : table)
    if (entry.value == value) return entry.name;
  return "invalid";  // a value outside the enumeration (never UB)
}

template <class E, std::size_t N>
std::optional<E> valueNamed(const std::string& name, const EnumName<E> (&table)[N]) {
  for (const auto& entry : table)
    if (name == entry.name) return entry.value;
  return std::nullopt;
}

template <class E, std::size_t N>
std::vector<std::string> namesOf(const EnumName<E> (&table)[N]) {
  std::vector<std::string> names;
  for (const auto& entry : table) names.push_back(entry.name);
  return names;
}

// Size limits (what one process can hold and finish in reasonable time).
constexpr int kMaxHidden = 16384;
constexpr int kMaxExperts = 4096;
constexpr int kMaxLayers = 512;
constexpr int kMaxFfn = 65536;
constexpr int kMaxBatch = 1 << 20;
constexpr int kMaxSeqLen = 1 << 20;
constexpr long long kMaxWorld = 1 << 16;
constexpr int kMaxMicrobatches = 1 << 16;
constexpr long long kMaxTokens = 1ll << 26;

// ---------------------------------------------------------------------------------------------
// Value readers: one JSON value -> one C++ value, or an InputError naming the path.

class ValueReader {
 public:
  explicit ValueReader(std::string file) : file_(std::move(file)) {}
  const std::string& file() const { return file_; }

  [[noreturn]] void fail(const std::string& path, const std::string& what) const {
    throw InputError(file_, path, what);
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
        fail(path, fmt::format("{}, got {}", expected, describe(value)));
      number = d;
    } else {
      fail(path, fmt::format("{}, got {}", expected, describe(value)));
    }
    if (number < min_value) fail(path, fmt::format("{}, got {}", expected, describe(value)));
    if (number > INT_MAX)
      fail(path, fmt::format("{}, got {} (beyond the largest supported integer, {})", expected,
                             describe(value), INT_MAX));
    return static_cast<int>(number);
  }

  // Any integer in [0, 2^64 - 1].
  std::uint64_t readUnsigned64(const Json& value, const std::string& path) const {
    const char* expected = "expected a non-negative integer";
    if (value.is_number_unsigned()) return value.get<std::uint64_t>();
    if (value.is_number_float()) {
      const double d = value.get<double>();
      if (std::floor(d) != d || d < 0) fail(path, fmt::format("{}, got {}", expected, describe(value)));
      if (d >= 18446744073709551616.0)
        fail(path, fmt::format("{}, got {} (beyond 2^64 - 1)", expected, describe(value)));
      return static_cast<std::uint64_t>(d);
    }
    fail(path, fmt::format("{}, got {}", expected, describe(value)));
  }

  // A finite number >= 0.
  double readNonNegative(const Json& value, const std::string& path) const {
    if (!value.is_number() || !std::isfinite(value.get<double>()) || value.get<double>() < 0)
      fail(path, fmt::format("expected a finite number >= 0, got {}", describe(value)));
    return value.get<double>();
  }

  bool readBool(const Json& value, const std::string& path) const {
    if (!value.is_boolean()) fail(path, fmt::format("expected true or false, got {}", describe(value)));
    return value.get<bool>();
  }

  std::string readString(const Json& value, const std::string& path) const {
    if (!value.is_string()) fail(path, fmt::format("expected a string, got {}", describe(value)));
    return value.get<std::string>();
  }

  // The index of `value` in `allowed`; throws naming every allowed value.
  std::size_t readChoice(const Json& value, const std::string& path,
                         const std::vector<std::string>& allowed) const {
    if (value.is_string()) {
      const std::string text = value.get<std::string>();
      for (std::size_t i = 0; i < allowed.size(); ++i)
        if (allowed[i] == text) return i;
      fail(path, fmt::format("expected one of {}, got {}{}", joinNames(allowed, "\""), describe(value),
                             didYouMean(text, allowed)));
    }
    fail(path, fmt::format("expected one of {}, got {}", joinNames(allowed, "\""), describe(value)));
  }

  // The object under `key` of `parent`, or nullptr when absent; throws when present but not an object.
  const Json* section(const Json& parent, const std::string& key, const std::string& path) const {
    if (!parent.contains(key)) return nullptr;
    const Json& value = parent[key];
    if (!value.is_object()) fail(path, fmt::format("expected an object, got {}", describe(value)));
    return &value;
  }

 private:
  std::string file_;
};

[[noreturn]] void failAt(const Scenario& sc, const std::string& path, const std::string& what) {
  throw InputError(sc.source_file, path, what);
}

void requireInRange(const Scenario& sc, const std::string& path, const char* name, int value,
                    int min_value, int max_value) {
  if (value < min_value) failAt(sc, path, fmt::format("expected an integer >= {}, got {}", min_value, value));
  if (value > max_value) failAt(sc, path, fmt::format("{} ({}) must be <= {}", name, value, max_value));
}

// ---------------------------------------------------------------------------------------------
// Field descriptors. A Field<S> is one key of a JSON object that maps onto a member of S.

template <class S>
struct Field {
  const char* key;
  // Reads the present value into `out` (type check and the reader's own minimum).
  std::function<void(const ValueReader&, const Json&, const std::string& path, S& out)> read;
  // The value as written (defaults filled in).
  std::function<OrderedJson(const S&)> write;
  // The range rule of the member, run by validateScenario on parsed and code-built scenarios
  // alike; empty when the reader's type check is the whole rule.
  std::function<void(const Scenario&, const S&, const std::string& path)> check;
  const char* required = nullptr;  // the message when the key is missing; nullptr = optional
};

template <class S>
using Fields = std::vector<Field<S>>;

template <class S>
Field<S> intField(const char* key, int S::*member, int min_value, int max_value) {
  return {key,
          [=](const ValueReader& r, const Json& v, const std::string& path, S& out) {
            out.*member = r.readInt(v, path, min_value);
          },
          [=](const S& s) { return OrderedJson(s.*member); },
          [=](const Scenario& sc, const S& s, const std::string& path) {
            requireInRange(sc, path, key, s.*member, min_value, max_value);
          }};
}

// A member read by one of ValueReader's typed reads and written as it is; `check` is its range rule
// (empty: the reader's type check is the whole rule).
template <class S, class T>
Field<S> typedField(const char* key, T S::*member, T (ValueReader::*read)(const Json&, const std::string&) const,
                    std::function<void(const Scenario&, const S&, const std::string&)> check = {}) {
  return {
      key,
      [=](const ValueReader& r, const Json& v, const std::string& path, S& out) { out.*member = (r.*read)(v, path); },
      [=](const S& s) { return OrderedJson(s.*member); }, std::move(check)};
}

// A coefficient: a finite number >= 0 (the reader's rule; overrides are checked again).
template <class S>
Field<S> coefficientField(const char* key, double S::*member) {
  return typedField<S, double>(
      key, member, &ValueReader::readNonNegative, [=](const Scenario& sc, const S& s, const std::string& path) {
        const double value = s.*member;
        if (!std::isfinite(value) || value < 0)
          failAt(sc, path, fmt::format("{} ({}) must be a finite number >= 0", key, numberText(value)));
      });
}

template <class S>
Field<S> boolField(const char* key, bool S::*member) {
  return typedField<S, bool>(key, member, &ValueReader::readBool);
}

template <class S>
Field<S> stringField(const char* key, std::string S::*member) {
  return typedField<S, std::string>(key, member, &ValueReader::readString);
}

template <class S, class E, std::size_t N>
Field<S> enumField(const char* key, E S::*member, const EnumName<E> (&table)[N]) {
  return {key,
          [member, &table](const ValueReader& r, const Json& v, const std::string& path, S& out) {
            out.*member = table[r.readChoice(v, path, namesOf(table))].value;
          },
          [member, &table](const S& s) { return OrderedJson(nameOf(s.*member, table)); },
          {}};
}

template <class S>
std::vector<std::string> keysOf(const Fields<S>& fields) {
  std::vector<std::string> keys;
  for (const Field<S>& f : fields) keys.push_back(f.key);
  return keys;
}

template <class S>
void readObject(const ValueReader& r, const Json& object, const std::string& path, const Fields<S>& fields,
                S& out) {
  json_input::rejectUnknownKeys(object, r.file(), path, keysOf(fields));
  for (const Field<S>& f : fields) {
    const std::string field_path = childPath(path, f.key);
    if (!object.contains(f.key)) {
      if (f.required) r.fail(field_path, f.required);
      continue;
    }
    f.read(r, object[f.key], field_path, out);
  }
}

// A nested object: its own fields, unknown keys rejected.
template <class S, class Sub>
Field<S> sectionField(const char* key, Sub S::*member, Fields<Sub> (*fields)()) {
  return {key,
          [=](const ValueReader& r, const Json& v, const std::string& path, S& out) {
            if (!v.is_object()) r.fail(path, fmt::format("expected an object, got {}", describe(v)));
            readObject(r, v, path, fields(), out.*member);
          },
          [=](const S& s) {
            OrderedJson object = OrderedJson::object();
            for (const Field<Sub>& f : fields())
              if (f.write) object[f.key] = f.write(s.*member);
            return object;
          },
          [=](const Scenario& sc, const S& s, const std::string& path) {
            for (const Field<Sub>& f : fields())
              if (f.check) f.check(sc, s.*member, childPath(path, f.key));
          }};
}

// ---------------------------------------------------------------------------------------------
// The scenario's fields, section by section, in the order they are written.

Fields<ModelConfig> modelFields() {
  return {intField("hidden", &ModelConfig::hidden, 1, kMaxHidden),
          intField("experts", &ModelConfig::experts, 1, kMaxExperts),
          intField("top_k", &ModelConfig::top_k, 1, kMaxExperts),
          intField("layers", &ModelConfig::layers, 1, kMaxLayers),
          intField("ffn", &ModelConfig::ffn, 1, kMaxFfn),
          enumField("score", &ModelConfig::score, kScoreNames),
          boolField("norm_topk_prob", &ModelConfig::norm_topk_prob),
          enumField("dtype", &ModelConfig::dtype, kDTypeNames)};
}

// One valid length per sequence, each in [0, seq_len]; empty means "all full" (what the data
// generator reads), so structs built in code need not fill it. Written filled in.
Field<DataConfig> validLengthsField() {
  return {"valid_lengths",
          [](const ValueReader& r, const Json& v, const std::string& path, DataConfig& out) {
            if (!v.is_array())
              r.fail(path, fmt::format("expected an array of {} integers in [0, seq_len], got {}", out.batch,
                                       describe(v)));
            out.valid_lengths.clear();
            for (std::size_t i = 0; i < v.size(); ++i)
              out.valid_lengths.push_back(r.readInt(v[i], childPath(path, i), 0));
          },
          [](const DataConfig& d) {
            std::vector<int> lengths = d.valid_lengths;
            if (lengths.empty() && d.batch > 0) lengths.assign(static_cast<std::size_t>(d.batch), d.seq_len);
            return OrderedJson(lengths);
          },
          {}};  // checked with the cross-field rules (checkValidLengths)
}

// One entry per sequence, each in [0, seq_len]; an empty vector means "all full".
void checkValidLengths(const Scenario& sc) {
  const DataConfig& d = sc.data;
  const std::string path = "/data/valid_lengths";
  const auto& lengths = d.valid_lengths;
  if (lengths.empty()) return;
  if (lengths.size() != static_cast<std::size_t>(d.batch))
    failAt(sc, path,
           fmt::format("expected {} entries (one per sequence, batch = {}), got {}", d.batch, d.batch, lengths.size()));
  long long total = 0;
  for (std::size_t i = 0; i < lengths.size(); ++i) {
    if (lengths[i] < 0 || lengths[i] > d.seq_len)
      failAt(sc, childPath(path, i),
             fmt::format("valid length {} must be in [0, seq_len = {}]", lengths[i], d.seq_len));
    total += lengths[i];
  }
  if (total == 0 && sc.aux.exclude_padding)
    failAt(sc, path, "every token is padding: at least one sequence needs a valid length > 0");
}

Fields<DataConfig> dataFields() {
  return {intField("batch", &DataConfig::batch, 1, kMaxBatch),
          intField("seq_len", &DataConfig::seq_len, 1, kMaxSeqLen), validLengthsField(),
          stringField("safetensors", &DataConfig::safetensors)};
}

Fields<AuxConfig> auxFields() {
  return {enumField("type", &AuxConfig::type, kAuxScopeNames),
          coefficientField("coeff", &AuxConfig::coeff),
          coefficientField("z_loss_coeff", &AuxConfig::z_loss_coeff),
          enumField("z_loss_scope", &AuxConfig::z_loss_scope, kZLossScopeNames),
          boolField("exclude_padding", &AuxConfig::exclude_padding),
          enumField("group_weighting", &AuxConfig::group_weighting, kGroupWeightingNames)};
}

// The parallel degrees live in MeshSizes (shared with every layer of the tool); the JSON keys are
// the mesh's own.
template <int MeshSizes::*member>
Field<MeshConfig> meshSizeField(const char* key, int max_value) {
  return {key,
          [](const ValueReader& r, const Json& v, const std::string& path, MeshConfig& out) {
            out.*member = r.readInt(v, path, 1);
          },
          [](const MeshConfig& m) { return OrderedJson(m.*member); },
          [key, max_value](const Scenario& sc, const MeshConfig& m, const std::string& path) {
            requireInRange(sc, path, key, m.*member, 1, max_value);
          }};
}

// Sequence parallelism: a boolean, or absent for the preset's default; written resolved.
Field<MeshConfig> sequenceParallelField() {
  return {"sequence_parallel",
          [](const ValueReader& r, const Json& v, const std::string& path, MeshConfig& out) {
            out.sequence_parallel = r.readBool(v, path);
          },
          nullptr,  // written by scenarioToJsonText with the preset's default filled in
          {}};
}

Fields<MeshConfig> meshFields() {
  return {meshSizeField<&MeshSizes::dp>("dp", static_cast<int>(kMaxWorld)),
          meshSizeField<&MeshSizes::pp>("pp", static_cast<int>(kMaxWorld)),
          meshSizeField<&MeshSizes::cp>("cp", static_cast<int>(kMaxWorld)),
          meshSizeField<&MeshSizes::tp>("tp", static_cast<int>(kMaxWorld)),
          meshSizeField<&MeshSizes::ep>("ep", static_cast<int>(kMaxWorld)),
          sequenceParallelField(),
          meshSizeField<&MeshSizes::microbatches>("microbatches", kMaxMicrobatches),
          enumField("schedule", &MeshConfig::schedule, kScheduleNames),
          intField("virtual_stages", &MeshConfig::virtual_stages, 1, kMaxLayers),
          enumField("cp_layout", &MeshConfig::cp_layout, kCpLayoutNames)};
}

Fields<FrameworkConfig> frameworkFields() {
  return {{"preset",
           [](const ValueReader& r, const Json& v, const std::string& path, FrameworkConfig& out) {
             const std::string name = r.readString(v, path);
             const std::optional<Preset> preset = presetNamed(name);
             if (!preset)
               r.fail(path, fmt::format("unknown preset \"{}\"{}; known presets: {}", name,
                                        didYouMean(name, presetNames()), joinNames(presetNames())));
             out.preset = *preset;
           },
           [](const FrameworkConfig& f) { return OrderedJson(toString(f.preset)); },
           {}},
          boolField("open_bugs", &FrameworkConfig::open_bugs)};
}

Fields<Expectation> expectFields() {
  return {enumField("verdict", &Expectation::verdict, kVerdictNames),
          {"diagnosis",
           [](const ValueReader& r, const Json& v, const std::string& path, Expectation& out) {
             const std::string name = r.readString(v, path);
             if (name.empty()) {
               out.diagnosis = DiagnosisCode::kNone;
               return;
             }
             const std::optional<DiagnosisCode> code = parseDiagnosisCode(name);
             if (!code)
               r.fail(path, fmt::format("unknown diagnosis code \"{}\"{}; expected \"\" (any) or one of {}",
                                        name, didYouMean(name, diagnosisCodeNames()),
                                        joinNames(diagnosisCodeNames())));
             out.diagnosis = *code;
           },
           [](const Expectation& e) { return OrderedJson(toString(e.diagnosis)); },
           {}},
          stringField("factor", &Expectation::factor)};
}

Fields<ToleranceConfig> toleranceFields() {
  return {{"rtol",
           [](const ValueReader& r, const Json& v, const std::string& path, ToleranceConfig& out) {
             out.rtol = r.readNonNegative(v, path);
           },
           [](const ToleranceConfig& t) { return OrderedJson(t.rtol); },
           [](const Scenario& sc, const ToleranceConfig& t, const std::string& path) {
             if (!std::isfinite(t.rtol) || t.rtol < 0 || t.rtol >= 1)
               failAt(sc, path,
                      fmt::format("rtol ({}) must be a finite number in [0, 1) (0 = derived from the dtype)",
                                  numberText(t.rtol)));
           }}};
}

// Faults: an array of catalog names, each listed once.
Field<Scenario> faultsField() {
  return {"faults",
          [](const ValueReader& r, const Json& v, const std::string& path, Scenario& out) {
            if (!v.is_array())
              r.fail(path, fmt::format("expected an array of fault names, got {}", describe(v)));
            out.faults.clear();
            for (std::size_t i = 0; i < v.size(); ++i) {
              const std::string item_path = childPath(path, i);
              const std::string name = r.readString(v[i], item_path);
              const std::optional<Fault> fault = faultNamed(name);
              if (!fault)
                r.fail(item_path, fmt::format("unknown fault \"{}\"{}; known faults: {}", name,
                                              didYouMean(name, faultNames()), joinNames(faultNames())));
              out.faults.push_back(*fault);
            }
          },
          [](const Scenario& s) {
            OrderedJson names = OrderedJson::array();
            for (Fault f : s.faults) names.push_back(toString(f));
            return names;
          },
          [](const Scenario& sc, const Scenario& s, const std::string& path) {
            for (std::size_t i = 0; i < s.faults.size(); ++i)
              for (std::size_t j = 0; j < i; ++j)
                if (s.faults[j] == s.faults[i])
                  failAt(sc, childPath(path, i),
                         fmt::format("fault \"{}\" is listed twice (first at /faults/{})", toString(s.faults[i]),
                                     j));
          }};
}

const Fields<Scenario>& scenarioFields() {
  static const Fields<Scenario> fields = {
      {"schema_version",
       [](const ValueReader& r, const Json& v, const std::string& path, Scenario& out) {
         out.schema_version = r.readInt(v, path, 0);
         if (out.schema_version != 1)
           r.fail(path, fmt::format("unsupported schema_version {}; this tool reads schema_version 1",
                                    out.schema_version));
       },
       [](const Scenario& s) { return OrderedJson(s.schema_version); },
       [](const Scenario& sc, const Scenario& s, const std::string& path) {
         if (s.schema_version != 1)
           failAt(sc, path, fmt::format("unsupported schema_version {}; this tool reads schema_version 1",
                                        s.schema_version));
       },
       "required key \"schema_version\" is missing; expected 1"},
      {"name",
       [](const ValueReader& r, const Json& v, const std::string& path, Scenario& out) {
         out.name = r.readString(v, path);
         if (out.name.empty()) r.fail(path, "expected a non-empty string, got \"\"");
       },
       [](const Scenario& s) { return OrderedJson(s.name); },
       {},
       "required key \"name\" is missing; expected a non-empty string"},
      stringField("description", &Scenario::description),
      {"seed",
       [](const ValueReader& r, const Json& v, const std::string& path, Scenario& out) {
         out.seed = r.readUnsigned64(v, path);
       },
       [](const Scenario& s) { return OrderedJson(s.seed); },
       {}},
      sectionField("model", &Scenario::model, modelFields),
      sectionField("data", &Scenario::data, dataFields),
      sectionField("aux", &Scenario::aux, auxFields),
      sectionField("mesh", &Scenario::mesh, meshFields),
      sectionField("framework", &Scenario::framework, frameworkFields),
      faultsField(),
      sectionField("expect", &Scenario::expect, expectFields),
      sectionField("tolerance", &Scenario::tolerance, toleranceFields),
  };
  return fields;
}

// ---------------------------------------------------------------------------------------------
// Cross-field rules (hand-written: each relates several fields).

class ScenarioValidator {
 public:
  explicit ScenarioValidator(const Scenario& scenario) : sc_(scenario) {}

  // Throws InputError on the first rule the scenario breaks.
  void run() const {
    for (const Field<Scenario>& f : scenarioFields())
      if (f.check) f.check(sc_, sc_, childPath("", f.key));

    const ModelConfig& model = sc_.model;
    const DataConfig& data = sc_.data;
    const MeshConfig& mesh = sc_.mesh;
    const long long world = mesh.world();
    if (world > kMaxWorld) {
      if (mesh.tp > 1)
        fail("/mesh", fmt::format("world size tp*cp*dp*pp ({}*{}*{}*{} = {}) must be <= {}", mesh.tp, mesh.cp, mesh.dp,
                                  mesh.pp, world, kMaxWorld));
      fail("/mesh", fmt::format("world size dp*pp*cp ({}*{}*{} = {}) must be <= {}", mesh.dp, mesh.pp, mesh.cp, world,
                                kMaxWorld));
    }
    const long long tokens = 1ll * data.batch * data.seq_len;
    if (tokens > kMaxTokens)
      fail("/data", fmt::format("batch*seq_len ({}*{} = {} tokens) must be <= {}", data.batch,
                                data.seq_len, tokens, kMaxTokens));

    if (model.top_k > model.experts)
      fail("/model/top_k", fmt::format("top_k ({}) must be <= experts ({})", model.top_k, model.experts));

    const long long batch_split = 1ll * mesh.dp * mesh.microbatches;
    if (data.batch % batch_split != 0)
      fail("/data/batch",
           fmt::format("batch ({}) must be divisible by dp*microbatches ({}*{} = {}): every "
                       "microbatch of every DP replica holds the same number of sequences",
                       data.batch, mesh.dp, mesh.microbatches, batch_split));

    if (mesh.cp_layout == CpLayout::kZigzag) {
      if (data.seq_len % (2 * mesh.cp) != 0)
        fail("/data/seq_len",
             fmt::format("seq_len ({}) must be divisible by 2*cp ({}) with cp_layout \"zigzag\"", data.seq_len,
                         2 * mesh.cp));
    } else if (data.seq_len % mesh.cp != 0) {
      fail("/data/seq_len", fmt::format("seq_len ({}) must be divisible by cp ({})", data.seq_len, mesh.cp));
    }

    const long long model_chunks = 1ll * mesh.pp * mesh.virtual_stages;
    if (model.layers % model_chunks != 0)
      fail("/model/layers", fmt::format("layers ({}) must be divisible by pp*virtual_stages ({}*{} = {})",
                                        model.layers, mesh.pp, mesh.virtual_stages, model_chunks));

    if (mesh.virtual_stages > 1 && mesh.schedule != Schedule::kInterleaved1F1B)
      fail("/mesh/virtual_stages",
           fmt::format("virtual_stages ({}) > 1 needs schedule \"interleaved_1f1b\", got \"{}\"",
                       mesh.virtual_stages, toString(mesh.schedule)));
    if (mesh.schedule == Schedule::kInterleaved1F1B && mesh.microbatches % mesh.pp != 0)
      fail("/mesh/microbatches",
           fmt::format("schedule \"interleaved_1f1b\" needs microbatches ({}) divisible by pp ({})",
                       mesh.microbatches, mesh.pp));

    checkValidLengths(sc_);

    // TP, SP and EP as the preset's framework allows them.
    requireMeshSupported(sc_);

    // The same applicability rule `run` relies on: a fault that cannot act is refused here too.
    requireFaultsApply(sc_);

    const std::uint64_t bytes = estimateMemoryBytes(sc_);
    if (bytes > kMaxScenarioBytes)
      fail("", fmt::format("estimated memory {:.2f} GiB exceeds the limit of {:.0f} GiB; reduce /data/batch, "
                           "/data/seq_len, /model/hidden, /model/experts, /model/ffn or /model/layers",
                           static_cast<double>(bytes) / (1ull << 30),
                           static_cast<double>(kMaxScenarioBytes) / (1ull << 30)));
  }

 private:
  [[noreturn]] void fail(const std::string& path, const std::string& what) const { failAt(sc_, path, what); }
  const Scenario& sc_;
};

}  // namespace

// ---------------------------------------------------------------------------------------------
// Public API.

Scenario parseScenarioText(const std::string& text, const std::string& file_for_errors) {
  const Json root = json_input::parseDocument(text, file_for_errors);
  if (!root.is_object())
    throw InputError(file_for_errors, "",
                     fmt::format("expected a JSON object at the top level, got {}", describe(root)));
  Scenario scenario;
  scenario.source_file = file_for_errors;
  readObject(ValueReader(file_for_errors), root, "", scenarioFields(), scenario);
  // Filled in here because the struct cannot default it: one valid length per sequence.
  if (scenario.data.valid_lengths.empty() && scenario.data.batch > 0)
    scenario.data.valid_lengths.assign(static_cast<std::size_t>(scenario.data.batch), scenario.data.seq_len);
  validateScenario(scenario);
  return scenario;
}

Scenario loadScenarioFile(const std::string& path) {
  std::error_code ec;
  if (std::filesystem::is_directory(path, ec)) throw InputError(path, "", "cannot read file: it is a directory");
  std::ifstream in(path, std::ios::binary);
  if (!in) throw InputError(path, "", fmt::format("cannot read file: {}", std::strerror(errno)));
  std::ostringstream content;
  content << in.rdbuf();
  if (in.bad()) throw InputError(path, "", fmt::format("cannot read file: {}", std::strerror(errno)));
  return parseScenarioText(content.str(), path);
}

void validateScenario(const Scenario& scenario) { ScenarioValidator(scenario).run(); }

Scenario resolveScenario(const Scenario& scenario) {
  Scenario resolved = scenario;
  if (resolved.aux.group_weighting == GroupWeighting::kPreset)
    resolved.aux.group_weighting = presetRecord(scenario.framework.preset).group_weighting;
  resolved.mesh.sequence_parallel = sequenceParallel(scenario);
  if (scenario.framework.open_bugs)
    for (Fault f : openBugsFor(scenario).applied)
      if (std::find(resolved.faults.begin(), resolved.faults.end(), f) == resolved.faults.end())
        resolved.faults.push_back(f);
  return resolved;
}

std::string scenarioToJsonText(const Scenario& scenario, int indent) {
  OrderedJson out = OrderedJson::object();
  for (const Field<Scenario>& f : scenarioFields()) out[f.key] = f.write(scenario);
  // sequence_parallel depends on the preset and tp when the file leaves it out: written resolved, after tp
  // and ep, where the reader takes it.
  OrderedJson mesh = OrderedJson::object();
  for (const auto& item : out["mesh"].items()) {
    mesh[item.key()] = item.value();
    if (item.key() == "ep") mesh["sequence_parallel"] = sequenceParallel(scenario);
  }
  out["mesh"] = mesh;
  return out.dump(indent, ' ', false, OrderedJson::error_handler_t::replace);
}

std::uint64_t estimateMemoryBytes(const Scenario& scenario) {
  // In double so that no product can overflow, whatever the (possibly unvalidated) sizes. The model
  // follows what a run holds at its peak (calibrated against measured peaks: bench/bench_memory.cpp,
  // bench/RESULTS.md): the process with LibTorch loaded, the float64 problem data for the whole run,
  // and the larger of the two phases that follow each other: the reference's forward cache, or the
  // mesh runs' activations (every rank's graph is alive at once; the mesh reads float64 data in place
  // and copies it for another dtype).
  const auto dim = [](int v) { return v > 0 ? static_cast<double>(v) : 0.0; };
  const double B = dim(scenario.data.batch), S = dim(scenario.data.seq_len);
  const double H = dim(scenario.model.hidden), E = dim(scenario.model.experts);
  const double L = dim(scenario.model.layers), F = dim(scenario.model.ffn), k = dim(scenario.model.top_k);
  const double T = B * S;
  const double process = 170.0 * (1 << 20);  // measured: `validate` 166 MB, a 1024-token run 188 MB
  const double weights = L * (H * E + 2.0 * E * H * F);
  const double data = 8.0 * (2.0 * T * H + weights);  // x, y and the weights, float64
  // Hidden states of every layer, h_L and the residual; about 8 [T, E] arrays per layer (logits,
  // exponentials, sigmoid pairs, the logit gradients); activations and layer l+1's logit changes.
  const double reference = 8.0 * (T * H * (L + 2.0) + 8.0 * L * T * E + L * T * k * (2.0 * F + E));
  const double dtype_bytes = scenario.model.dtype == DType::kFloat64 ? 8.0
                             : scenario.model.dtype == DType::kFloat32 ? 4.0 : 2.0;
  // Per token in flight, about 2L + 3 [., H] tensors (a layer's input and output, the main loss's
  // difference and square, the backward's gradients). A pipeline rank holds at most pp x
  // virtual_stages of its M microbatches' graphs at once (1F1B's warm-up; all M with M smaller), so
  // with M > pp v only that share of the tokens is in flight (bench_memory, medium-2048: dp 2, cp 2,
  // M 2 on pp 1, estimated 1.26-1.35x its measured peak when every token was counted in flight).
  const double M = std::max(1.0, dim(scenario.mesh.microbatches));
  const double stages_in_flight = std::max(1.0, dim(scenario.mesh.pp) * dim(scenario.mesh.virtual_stages));
  const double in_flight = std::min(M, stages_in_flight) / M;
  const double mesh_inputs = scenario.model.dtype == DType::kFloat64 ? 0.0 : dtype_bytes * (2.0 * T * H + weights);
  const double mesh = mesh_inputs + dtype_bytes * T * H * (2.0 * L + 3.0) * in_flight;
  const double bytes = process + data + std::max(reference, mesh);
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

const char* toString(ScoreFunction v) { return nameOf(v, kScoreNames); }
const char* toString(AuxScope v) { return nameOf(v, kAuxScopeNames); }
const char* toString(ZLossScope v) { return nameOf(v, kZLossScopeNames); }
const char* toString(GroupWeighting v) { return nameOf(v, kGroupWeightingNames); }
const char* toString(DType v) { return nameOf(v, kDTypeNames); }
const char* toString(Schedule v) { return nameOf(v, kScheduleNames); }
const char* toString(CpLayout v) { return nameOf(v, kCpLayoutNames); }
const char* toString(MainLossScope v) { return nameOf(v, kMainLossScopeNames); }
const char* toString(Verdict v) { return nameOf(v, kVerdictNames); }

std::optional<Verdict> verdictNamed(const std::string& name) { return valueNamed(name, kVerdictNames); }
std::optional<AuxScope> auxScopeNamed(const std::string& name) { return valueNamed(name, kAuxScopeNames); }
std::optional<ZLossScope> zLossScopeNamed(const std::string& name) {
  return valueNamed(name, kZLossScopeNames);
}
std::optional<ScoreFunction> scoreFunctionNamed(const std::string& name) {
  return valueNamed(name, kScoreNames);
}
std::optional<GroupWeighting> groupWeightingNamed(const std::string& name) {
  return valueNamed(name, kGroupWeightingNames);
}
std::optional<DType> dtypeNamed(const std::string& name) { return valueNamed(name, kDTypeNames); }

DType parseDType(const std::string& name) {
  if (const std::optional<DType> dtype = dtypeNamed(name)) return *dtype;
  throw UsageError(fmt::format("unknown dtype \"{}\"; expected one of {}", name, joinNames(namesOf(kDTypeNames))));
}

}  // namespace moe
