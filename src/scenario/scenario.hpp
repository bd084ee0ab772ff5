// The scenario contract of DESIGN.md §6 (schema_version 1) as typed structs. No torch here: the
// scenario layer is shared by the simulation and by the reference that judges it.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace moe {

enum class ScoreFunction { kSoftmax, kSigmoid };
enum class AuxScope { kMicroBatch, kSequence, kGlobalBatch };
enum class ZLossScope { kMicroBatch, kGlobalBatch };
enum class DType { kFloat64, kFloat32, kBFloat16 };
enum class Schedule { kGPipe, kOneFOneB, kInterleaved1F1B };
enum class CpLayout { kContiguous, kZigzag };
// How the main loss is normalized (DESIGN §3 "scope per framework convention"):
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
//  kPreset:  whichever the preset computes (the default).
enum class GroupWeighting { kPreset, kUniform, kTokens };

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
  // When non-empty: a safetensors file holding x, y, valid and the weights (DESIGN §6 "bring your
  // own router data"); the path is resolved relative to the scenario file.
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

struct MeshConfig {
  int dp = 1;
  int pp = 1;
  int cp = 1;
  int microbatches = 1;  // per DP replica (gradient-accumulation steps of one optimizer step)
  Schedule schedule = Schedule::kOneFOneB;
  int virtual_stages = 1;  // model chunks per pipeline rank; > 1 only with interleaved_1f1b
  CpLayout cp_layout = CpLayout::kContiguous;
};

struct FrameworkConfig {
  std::string preset = "megatron";
};

struct Expectation {
  std::string verdict = "pass";  // "pass" | "fail"
  std::string diagnosis;         // a diagnosis code; empty = any
  std::string factor;            // e.g. "1/dp"; empty = any
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
  std::vector<std::string> faults;
  Expectation expect;
  ToleranceConfig tolerance;

  std::string source_file;  // where it was loaded from (for error messages); not part of the JSON
};

// Loads, fills defaults and validates. Throws InputError naming the file, the JSON path and what was
// expected. Unknown keys are errors.
Scenario loadScenarioFile(const std::string& path);
Scenario parseScenarioText(const std::string& text, const std::string& file_for_errors);

// Cross-field rules of a resolved scenario (also re-run after command-line overrides such as --mesh).
// Throws InputError; `file` is used in the message.
void validateScenario(const Scenario& scenario);

// The resolved scenario as JSON text (defaults filled in), as echoed in the report.
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
DType parseDType(const std::string& name);  // throws UsageError on an unknown name

}  // namespace moe
