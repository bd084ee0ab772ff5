// The scenario contract (schema_version 1, docs/scenario-format in the README) as typed structs. No
// torch here: the scenario layer is shared by the simulation and by the reference that judges it.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "common/diagnosis_code.hpp"

namespace moe {

enum class ScoreFunction { kSoftmax, kSigmoid };
enum class AuxScope { kMicroBatch, kSequence, kGlobalBatch };
enum class ZLossScope { kMicroBatch, kGlobalBatch };
enum class DType { kFloat64, kFloat32, kBFloat16 };
enum class Schedule { kGPipe, kOneFOneB, kInterleaved1F1B };
enum class CpLayout { kContiguous, kZigzag };
enum class Verdict { kPass, kFail };
// How the main loss is normalized:
//  kMicrobatchMean: mean over (DP replica, microbatch) of each microbatch's valid-token mean
//                   (Megatron default, DeepSpeed);
//  kTokenMean:      one mean over all valid tokens of the global batch (Megatron per-token mode,
//                   NeMo Automodel, torchtitan, HF Trainer with average_tokens_across_devices).
enum class MainLossScope { kMicrobatchMean, kTokenMean };
// How the aux groups of one step are averaged:
//  kUniform: every group (with tokens) weighs the same: alpha * mean over groups (Megatron default,
//            NeMo Automodel, DeepSpeed, HF);
//  kTokens:  groups weigh by their token count: alpha * sum_G T_G L_G / sum_G T_G (Megatron
//            per-token mode, torchtitan: raw_sum * coeff / global_valid_tokens);
//  kPreset:  whichever the preset computes (the default; resolveScenario replaces it).
enum class GroupWeighting { kPreset, kUniform, kTokens };

// The router loss terms an objective is made of, as a scenario (model and aux sections) and a capture's
// manifest (objective) both state them: the score function and top-k routing, the load-balancing aux
// loss (its group scope, coefficient alpha and group weighting) and the router z-loss (coefficient
// beta, scope). ObjectiveDefinition (reference/objective.hpp) and CaptureObjective extend it.
struct RouterLossTerms {
  ScoreFunction score = ScoreFunction::kSoftmax;
  int top_k = 2;
  bool norm_topk_prob = false;
  AuxScope aux_scope = AuxScope::kMicroBatch;
  double aux_coeff = 0.0;  // alpha
  double z_coeff = 0.0;    // beta
  ZLossScope z_scope = ZLossScope::kMicroBatch;
  bool exclude_padding = true;  // aux and z-loss token sets: valid tokens only (true) or all tokens
  // How groups are averaged (resolved: never kPreset). Applies to the micro_batch z-loss groups too.
  GroupWeighting group_weighting = GroupWeighting::kUniform;
};

// The framework conventions the tool models (src/scenario/catalog.cpp holds one record each).
enum class Preset { kMegatron, kMegatronPerToken, kNemoAutomodel, kTorchtitan, kDeepSpeed, kHfTrainer };
// The catalog's named faults, each a shipped bug (src/scenario/catalog.cpp: one record each).
enum class Fault {
  kDiscardApplyReturn,
  kMissingBackwardScale,
  kAccumulationOverweight,
  kGlobalTokenNormalization,
  kMissingCpScale,
  kSeqAuxMissingMbs,
  kCountPadding,
  kWorldSizeMultiply,
  kAutogradAllreduceStats,
  kStaleTokenDenominator,
  kBatchWiseCountsPerMicrobatch,
  kCoeffAsGate,
  kPerTokenShardCount,
  kZlossLocalShardMean,
  kSeqAuxMeanValidLength,
  kPerTokenLocalCount,
  kInplaceCountAllreduce,
  kRouterGradNotSummedOverTp,
  kTpReduceWithoutEp,
  kRouterGradSummedOverTpReplicated,
  kEpRouterGradLocalSlots,
  kTpMainGradOneShare,
  kPerTokenMissingCount,
};

struct ModelConfig {
  int hidden = 32;
  int experts = 8;
  int top_k = 2;
  int layers = 2;
  int ffn = 16;
  ScoreFunction score = ScoreFunction::kSoftmax;
  bool norm_topk_prob = false;
  DType dtype = DType::kFloat64;  // precision of the simulated mesh; the reference is always float64
};

struct DataConfig {
  int batch = 8;
  int seq_len = 16;
  // One entry per sequence, each in [0, seq_len]; filled with seq_len when absent.
  std::vector<int> valid_lengths;
  // When non-empty: a safetensors file holding x, y, valid and the weights ("bring your own router
  // data"); the path is resolved relative to the scenario file.
  std::string safetensors;
};

struct AuxConfig {
  AuxScope type = AuxScope::kMicroBatch;
  double coeff = 0.01;
  double z_loss_coeff = 0.0;
  ZLossScope z_loss_scope = ZLossScope::kMicroBatch;
  bool exclude_padding = true;
  GroupWeighting group_weighting = GroupWeighting::kPreset;
};

// The sizes of a parallel mesh: the one bag of parallel degrees every layer of the tool uses (the
// scenario's mesh, the rank layout, the scale inputs of a convention, the quantities a diagnosis
// attributes a factor to, the report's mesh summary). tp and ep stay 1 until the scenario names them.
struct MeshSizes {
  int tp = 1;            // tensor parallel
  int cp = 1;            // context parallel
  int dp = 1;            // data parallel
  int pp = 1;            // pipeline parallel
  int ep = 1;            // expert parallel: carved out of tp*cp*dp, it does not multiply the world
  int microbatches = 1;  // per DP replica (gradient-accumulation steps of one optimizer step)
  long long world() const { return 1ll * tp * cp * dp * pp; }
};

struct MeshConfig : MeshSizes {
  // Sequence parallelism: with TP, the router routes its S/(tp*cp) shard of every sequence. Unset:
  // the preset's default (resolveScenario): on whenever tp > 1 for Megatron, off elsewhere.
  std::optional<bool> sequence_parallel;
  Schedule schedule = Schedule::kOneFOneB;
  int virtual_stages = 1;  // model chunks per pipeline rank; > 1 only with interleaved_1f1b
  CpLayout cp_layout = CpLayout::kContiguous;
};

struct FrameworkConfig {
  Preset preset = Preset::kMegatron;
  // Add the catalog faults the preset's framework still ships (its record's open_bugs) that apply to
  // the scenario's scope and mesh (run --with-open-bugs).
  bool open_bugs = false;
};

struct Expectation {
  Verdict verdict = Verdict::kPass;
  DiagnosisCode diagnosis = DiagnosisCode::kNone;  // kNone = any
  std::string factor;                              // e.g. "1/dp"; empty = any
};

struct ToleranceConfig {
  double rtol = 0.0;  // 0 = derived from the dtype (see defaultRtol)
};

struct Scenario {
  int schema_version = 1;
  std::string name;
  std::string description;
  std::uint64_t seed = 0;
  ModelConfig model;
  DataConfig data;
  AuxConfig aux;
  MeshConfig mesh;
  FrameworkConfig framework;
  std::vector<Fault> faults;
  Expectation expect;
  ToleranceConfig tolerance;

  std::string source_file;  // where it was loaded from (for error messages); not part of the JSON
};

// Loads, fills defaults and validates. Throws InputError naming the file, the JSON path and what was
// expected. Unknown keys are errors.
Scenario loadScenarioFile(const std::string& path);
Scenario parseScenarioText(const std::string& text, const std::string& file_for_errors);

// Every rule of a scenario: ranges, cross-field rules, the faults' applicability to the preset,
// scope and mesh (the same rule `run` applies), and the memory bound. Also re-run after command-line
// overrides such as --mesh. Throws InputError naming scenario.source_file and the JSON path.
void validateScenario(const Scenario& scenario);

// The scenario with every preset-dependent default replaced by what the preset computes
// (aux.group_weighting, mesh.sequence_parallel) and, with framework.open_bugs, the preset's open bugs
// that apply added to the faults: what runs, and what the report echoes, so that a reader of a report
// knows which objective, mesh and faults were checked.
Scenario resolveScenario(const Scenario& scenario);

// mesh.sequence_parallel, or the preset's default when unset.
bool sequenceParallel(const Scenario& scenario);

// The scenario as JSON text (defaults filled in), as echoed in the report and written by
// `selftest --export`; parseScenarioText reads it back to an equal scenario.
std::string scenarioToJsonText(const Scenario& scenario, int indent = 2);

// Rough peak memory of a run in bytes (activations of the whole batch, weights, reference buffers);
// validation rejects scenarios above kMaxScenarioBytes.
std::uint64_t estimateMemoryBytes(const Scenario& scenario);
constexpr std::uint64_t kMaxScenarioBytes = 8ull << 30;

// Default relative tolerance for a dtype (float64 1e-7, float32 1e-4, bfloat16 2e-1).
double defaultRtol(DType dtype);

// The names used in JSON, on the command line and in reports.
const char* toString(ScoreFunction v);
const char* toString(AuxScope v);
const char* toString(ZLossScope v);
const char* toString(DType v);
const char* toString(Schedule v);
const char* toString(CpLayout v);
const char* toString(MainLossScope v);
const char* toString(GroupWeighting v);
const char* toString(Verdict v);
const char* toString(Preset v);
const char* toString(Fault v);
// The enumerator of a JSON name, or nullopt.
std::optional<Preset> presetNamed(const std::string& name);
std::optional<Fault> faultNamed(const std::string& name);
std::optional<Verdict> verdictNamed(const std::string& name);
std::optional<AuxScope> auxScopeNamed(const std::string& name);
std::optional<ZLossScope> zLossScopeNamed(const std::string& name);
std::optional<ScoreFunction> scoreFunctionNamed(const std::string& name);
std::optional<GroupWeighting> groupWeightingNamed(const std::string& name);
std::optional<DType> dtypeNamed(const std::string& name);
DType parseDType(const std::string& name);  // throws UsageError naming the allowed names
std::vector<std::string> presetNames();
std::vector<std::string> faultNames();

}  // namespace moe
