// The catalog: one record per framework preset and one per named fault, the way nccl-tests
// registers one testColl record per collective. The simulation (src/sim/convention.cpp), the
// reference's objective, validation, `list`, `selftest` and the diagnosis all read these records;
// none of them compares names. Torch-free, so validation and `list` need no model.
//
// Adding a preset: one PresetRecord in catalog.cpp; a rule kind it needs that no other preset has
// is one more enumerator below plus its case in convention.cpp. Adding a fault: one FaultRecord in
// catalog.cpp (applicability predicate, expected signature, selftest mesh) plus the hook that
// changes the step, where the step computes the quantity the fault breaks.
#pragma once

#include <string>
#include <vector>

#include "scenario/scenario.hpp"

namespace moe {

// How the aux gradient enters backward.
enum class Injection {
  kAutoScaler,        // Megatron/Automodel MoEAuxLossAutoScaler on the gate weights, backward scale
  kIdentityFunction,  // torchtitan _AuxLossInjection: identity forward, scale applied to the value
  kLossAdd,           // DeepSpeed / HF: aux added to the loss that backward starts from
};
// The DP (dp x cp) gradient reduction of DDP/FSDP.
enum class GradReduction { kMean, kSum };

// What one microbatch's summed per-token main loss is multiplied by before backward.
enum class MainLossNormalization {
  kCpOverTokensAndM,    // Megatron forward_step / DeepSpeed: / valid tokens * cp / M
  kNone,                // summed; a later division (PostReduction) normalizes
  kDpCpOverGlobalTokens,  // Automodel, HF Trainer: / global tokens * |dp_cp|
  kOverGlobalTokens,    // torchtitan: / global valid tokens (gradients summed)
  kAutomodelRecipe,     // Automodel: kDpCpOverGlobalTokens, or kNone with PP (then
                        // scale_grads_and_clip_grad_norm divides after the reduction)
};

// The MoEAuxLossAutoScaler backward scale a preset sets (autoscaler presets only).
enum class AutoScalerScale {
  kNotUsed,          // the preset does not inject with the autoscaler
  kCpOverM,          // Megatron schedules.forward_step_calc_loss: loss_scale * cp / M (PR #2237)
  kOne,              // Megatron per-token mode: loss_scale only
  kAutomodelRecipe,  // Automodel BaseRecipe._set_moe_aux_loss_backward_scale (PR #3359): cp / M, and
                     // x num_label_tokens / |dp_cp| with PP
};

// How a rank's partial aux loss is premultiplied before it is injected or added.
enum class AuxPremultiplier {
  kNone,
  kGroupTokens,       // Megatron per-token mode: x valid tokens of the group (attach_and_log_...)
  kTokenShareOfStep,  // torchtitan AuxLoss.inject: raw_sum * coeff / global_valid_tokens
  kCpOverM,           // added to the loss the way the main loss is normalized (DeepSpeed, HF)
};

// What divides every gradient after the DP reduction.
enum class PostReduction {
  kNone,
  kGlobalTokens,       // Megatron finalize_model_grads in per-token mode: / global loss tokens
  kAutomodelPipeline,  // Automodel scale_grads_and_clip_grad_norm under PP: / (tokens / |dp_cp|)
};

// Whether the framework allows sequence parallelism with TP (Megatron refuses MoE training with TP
// but without SP; NeMo Automodel refuses SP plans on MoE; DeepSpeed's Ulysses SP with MoE is not
// covered by a source).
enum class SequenceParallelRule { kRequiredWithTp, kOptional, kRefused };

// Which tokens a router on a TP rank sees.
enum class RouterTokensOverTp {
  kShardedWithSp,  // Megatron: the router routes its S/(tp*cp) sequence-parallel shard
  kShardedWithEp,  // torchtitan: EP on redistributes the router input to the sequence-parallel
                   // placement (tokens split over TP); EP off: replicated on TP
  kReplicated,     // NeMo Automodel, DeepSpeed: every TP rank routes the same tokens
  kUnsupported,    // HF Trainer: no TP
};

// Which ranks an EP group is carved from (EP never adds ranks).
enum class ExpertParallelCarve {
  kTensorContextData,  // Megatron (expert grid over the tp*cp*dp block), torchtitan, NeMo Automodel
  kData,               // DeepSpeed groups._get_expert_parallel_ranks: EP inside DP
  kUnsupported,        // HF Trainer
};

struct PresetRecord {
  Preset id;
  const char* name;
  const char* summary;  // one line: how it injects and scales the aux gradient
  const char* source;   // the public files, functions and PRs it follows
  Injection injection;
  GradReduction grad_reduction;
  MainLossScope main_loss_scope;       // the main objective the preset's normalization computes
  GroupWeighting group_weighting;      // kUniform or kTokens: how the preset averages aux groups
  MainLossNormalization main_loss;
  AutoScalerScale autoscaler_scale;
  AuxPremultiplier aux_premultiplier;
  PostReduction post_reduction;
  bool divides_by_microbatches;  // every microbatch's loss / M (else normalized by token counts)
  const char* scale_knob;        // the knob a fix of a scaling bug changes, in the framework's words
  // TP / SP / EP rules, each with its source in catalog.cpp.
  SequenceParallelRule sequence_parallel;
  RouterTokensOverTp router_tokens;
  ExpertParallelCarve expert_parallel;
  const char* parallel_source;  // where the TP/SP/EP rules come from
  // The catalog faults the framework's current upstream code still has (list presets,
  // run --with-open-bugs).
  std::vector<Fault> open_bugs;
};

// What a fault's applicability predicate looks at.
struct FaultContext {
  const PresetRecord& preset;
  const Scenario& scenario;
};

// The mesh and objective on which `selftest` shows a fault's signature: every mesh quantity that
// matters distinct from the others (dp 3, cp 2, M 5 by default).
struct SelftestMesh {
  Preset preset;
  AuxScope scope;
  int dp = 3, cp = 1, microbatches = 5;
  bool padding = true;  // unequal valid lengths
  int tp = 1, ep = 1;
  double z_loss_coeff = 0.0;
  bool exclude_padding = true;  // false: padding counted, as without a padding mask
};

struct FaultRecord {
  Fault id;
  const char* name;
  const char* summary;         // the mechanism: what it changes in the step
  const char* source;          // the issue or PR it reproduces
  DiagnosisCode expected_diagnosis;
  const char* expected_factor;  // attributed factor ("1/dp", "M", "0", ...) or "" (direction)
  // Whether the fault can act on this preset, scope and mesh: a fault that cannot would silently do
  // nothing, so `validate` and `run` both refuse it (exit 2) with `applies_to` in the message.
  bool (*applies)(const FaultContext&);
  const char* applies_to;  // "to presets that inject with MoEAuxLossAutoScaler (...)"
  SelftestMesh selftest;
};

const std::vector<PresetRecord>& presetCatalog();
const std::vector<FaultRecord>& faultCatalog();
const PresetRecord& presetRecord(Preset preset);
const FaultRecord& faultRecord(Fault fault);

// Throws InputError(scenario.source_file, "/faults/<i>", ...) for the first fault that cannot act on
// the scenario's preset, scope and mesh.
void requireFaultsApply(const Scenario& scenario);

// Throws InputError(scenario.source_file, "/mesh/...", ...) when the preset's framework does not
// support the mesh's TP, SP or EP (the rules of PresetRecord::sequence_parallel, router_tokens and
// expert_parallel), naming the rule's source.
void requireMeshSupported(const Scenario& scenario);

// Whether each TP rank's router sees its own share of the tokens (else every TP rank routes the same
// tokens): the preset's rule applied to the scenario's mesh.
bool routerTokensShardedOverTp(const Scenario& scenario);

// The open bugs of the scenario's preset split into those that can act on its scope and mesh and the
// others, with the reason.
struct OpenBugs {
  std::vector<Fault> applied;
  std::vector<std::pair<Fault, std::string>> skipped;
};
OpenBugs openBugsFor(const Scenario& scenario);

}  // namespace moe
