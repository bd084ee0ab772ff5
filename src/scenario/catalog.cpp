// The preset and fault records. Each cites the public code, issue or PR it follows, so that a
// report can cite it too.
#include "scenario/catalog.hpp"

#include <fmt/format.h>

#include "common/errors.hpp"

namespace moe {

const std::vector<PresetRecord>& presetCatalog() {
  static const std::vector<PresetRecord> presets = {
      {Preset::kMegatron, "megatron",
       "MoEAuxLossAutoScaler on the routing weights, backward scale cp/M; DDP averages over dp*cp; "
       "main loss mean per microbatch / M",
       "Megatron-LM moe_utils.MoEAuxLossAutoScaler, schedules.forward_step_calc_loss (PR #2237)",
       Injection::kAutoScaler, GradReduction::kMean, MainLossScope::kMicrobatchMean,
       GroupWeighting::kUniform, MainLossNormalization::kCpOverTokensAndM, AutoScalerScale::kCpOverM,
       AuxPremultiplier::kNone, PostReduction::kNone, true,
       "the MoEAuxLossAutoScaler backward scale (schedules.forward_step_calc_loss)"},
      {Preset::kMegatronPerToken, "megatron_per_token",
       "--calculate-per-token-loss: aux premultiplied by valid tokens*cp, backward scale 1; grads "
       "summed over dp*cp and divided by the global loss-token count in finalize_model_grads",
       "Megatron-LM router.attach_and_log_load_balancing_loss, finalize_model_grads (PR #5047)",
       Injection::kAutoScaler, GradReduction::kSum, MainLossScope::kTokenMean, GroupWeighting::kTokens,
       MainLossNormalization::kNone, AutoScalerScale::kOne, AuxPremultiplier::kGroupTokens,
       PostReduction::kGlobalTokens, false,
       "the MoEAuxLossAutoScaler backward scale (schedules.forward_step_calc_loss)"},
      {Preset::kNemoAutomodel, "nemo_automodel",
       "copy of MoEAuxLossAutoScaler, main_loss_backward_scale = cp/M (x num_label_tokens/(dp*cp) "
       "with PP); FSDP averages over dp*cp; main loss sum / global label tokens * dp*cp",
       "NeMo Automodel layers.Gate, BaseRecipe._set_moe_aux_loss_backward_scale (PR #3359)",
       Injection::kAutoScaler, GradReduction::kMean, MainLossScope::kTokenMean,
       GroupWeighting::kUniform, MainLossNormalization::kAutomodelRecipe,
       AutoScalerScale::kAutomodelRecipe, AuxPremultiplier::kNone, PostReduction::kAutomodelPipeline,
       true,
       "MoEAuxLossAutoScaler.main_loss_backward_scale (BaseRecipe._set_moe_aux_loss_backward_scale)"},
      {Preset::kTorchtitan, "torchtitan",
       "identity-forward autograd.Function on the scores, coeff/global_valid_tokens applied at "
       "injection; FSDP gradient division disabled (sum over dp)",
       "torchtitan AuxLoss / _AuxLossInjection (PR #3864), disable_fsdp_gradient_division",
       Injection::kIdentityFunction, GradReduction::kSum, MainLossScope::kTokenMean,
       GroupWeighting::kTokens, MainLossNormalization::kOverGlobalTokens, AutoScalerScale::kNotUsed,
       AuxPremultiplier::kTokenShareOfStep, PostReduction::kNone, false,
       "the AuxLoss step denominator (AuxLoss.set_step_denominator)"},
      {Preset::kDeepSpeed, "deepspeed",
       "l_aux returned and added to the loss by the user; engine divides by gradient accumulation "
       "steps and averages over dp",
       "DeepSpeed sharded_moe.topkgating, engine.backward", Injection::kLossAdd, GradReduction::kMean,
       MainLossScope::kMicrobatchMean, GroupWeighting::kUniform,
       MainLossNormalization::kCpOverTokensAndM, AutoScalerScale::kNotUsed, AuxPremultiplier::kCpOverM,
       PostReduction::kNone, true, "the multiplier of the aux term added to the loss"},
      {Preset::kHfTrainer, "hf_trainer",
       "aux added to the loss inside the model forward (loss += coef*aux); Trainer with "
       "average_tokens_across_devices; aux divided by accumulation steps and kept out of the "
       "world-size multiply (the fix proposed in PRs #48691/#48706)",
       "HF transformers load_balancing_loss_func, Trainer.training_step (#48690)",
       Injection::kLossAdd, GradReduction::kMean, MainLossScope::kTokenMean, GroupWeighting::kUniform,
       MainLossNormalization::kDpCpOverGlobalTokens, AutoScalerScale::kNotUsed,
       AuxPremultiplier::kCpOverM, PostReduction::kNone, true,
       "the multiplier of the aux term added to the loss"},
  };
  return presets;
}

namespace {

// Applicability predicates of the faults (FaultRecord::applies).
bool injectsWithAutoScaler(const FaultContext& c) { return c.preset.injection == Injection::kAutoScaler; }
bool scaleCarriesCp(const FaultContext& c) {
  return c.preset.autoscaler_scale == AutoScalerScale::kCpOverM ||
         c.preset.autoscaler_scale == AutoScalerScale::kAutomodelRecipe;
}
bool globalScopeUnderDpMean(const FaultContext& c) {
  return c.scenario.aux.type == AuxScope::kGlobalBatch && c.preset.grad_reduction == GradReduction::kMean;
}
bool perTokenSequenceAux(const FaultContext& c) {
  return c.preset.aux_premultiplier == AuxPremultiplier::kGroupTokens &&
         c.scenario.aux.type == AuxScope::kSequence;
}
bool addsAuxToTheLoss(const FaultContext& c) { return c.preset.injection == Injection::kLossAdd; }
bool statisticsAllReduced(const FaultContext& c) { return c.scenario.aux.type != AuxScope::kSequence; }
bool globalScope(const FaultContext& c) { return c.scenario.aux.type == AuxScope::kGlobalBatch; }
bool always(const FaultContext&) { return true; }

}  // namespace

const std::vector<FaultRecord>& faultCatalog() {
  static const std::vector<FaultRecord> faults = {
      {Fault::kDiscardApplyReturn, "discard_apply_return",
       "MoEAuxLossAutoScaler.apply() return value discarded: the injection never joins the graph",
       "NeMo Automodel #1408 (fixed by PR #1412)", DiagnosisCode::kAuxGradMissing, "0", always, "",
       {Preset::kNemoAutomodel, AuxScope::kMicroBatch, 3, 1, 5, true}},
      {Fault::kMissingBackwardScale, "missing_backward_scale",
       "main_loss_backward_scale never set (stays 1) while DP averaging and PP rescaling still apply "
       "(with PP the factor is dp*M/tokens)",
       "NeMo Automodel #1408 (fixed by PR #1412)", DiagnosisCode::kAuxGradScaled, "M/cp",
       injectsWithAutoScaler,
       "to presets that inject with MoEAuxLossAutoScaler (megatron, megatron_per_token, "
       "nemo_automodel)",
       {Preset::kNemoAutomodel, AuxScope::kMicroBatch, 3, 2, 5, true}},
      {Fault::kAccumulationOverweight, "accumulation_overweight",
       "backward scale without the / M of gradient accumulation: the aux gradient is summed over "
       "microbatches (the over-weighting PR #3359 removed from PR #1412's scale)",
       "NeMo Automodel between PR #1412 and PR #3359", DiagnosisCode::kAuxGradScaled, "M",
       injectsWithAutoScaler,
       "to presets that inject with MoEAuxLossAutoScaler (megatron, megatron_per_token, "
       "nemo_automodel)",
       {Preset::kMegatron, AuxScope::kMicroBatch, 3, 1, 5, true}},
      {Fault::kGlobalTokenNormalization, "global_token_normalization",
       "global aux loss divided by the global token count while probs stay local",
       "Megatron-LM #3672", DiagnosisCode::kAuxGradScaled, "1/dp", globalScopeUnderDpMean,
       "to aux.type global_batch with a DP-averaging preset (megatron, nemo_automodel, deepspeed, "
       "hf_trainer)",
       {Preset::kMegatron, AuxScope::kGlobalBatch, 3, 1, 5, true}},
      {Fault::kMissingCpScale, "missing_cp_scale",
       "backward scale lacks x cp although each CP rank holds a partial aux loss and DDP averages "
       "over dp*cp",
       "Megatron-LM #1652 (fixed by PR #2237)", DiagnosisCode::kAuxGradScaled, "1/cp", scaleCarriesCp,
       "to presets whose backward scale carries x cp (megatron, nemo_automodel)",
       {Preset::kMegatron, AuxScope::kMicroBatch, 3, 2, 5, true}},
      {Fault::kSeqAuxMissingMbs, "seq_aux_missing_mbs",
       "sequence aux loss in per-token mode premultiplied by valid tokens without x micro-batch size",
       "Megatron-LM #5798", DiagnosisCode::kAuxGradScaled, "1/mbs", perTokenSequenceAux,
       "to preset megatron_per_token with aux.type sequence",
       {Preset::kMegatronPerToken, AuxScope::kSequence, 1, 1, 5, false}},
      {Fault::kCountPadding, "count_padding", "padding tokens counted in f and P of the aux loss",
       "Megatron-LM #1982/#1984 (fixed by PR #2121)", DiagnosisCode::kAuxGradDirection, "", always, "",
       {Preset::kMegatron, AuxScope::kMicroBatch, 3, 1, 5, true}},
      {Fault::kWorldSizeMultiply, "world_size_multiply",
       "Trainer multiplies the whole loss, aux included, by the world size before DDP averaging",
       "HF transformers #48690", DiagnosisCode::kAuxGradScaled, "dp", addsAuxToTheLoss,
       "to loss-add presets (deepspeed, hf_trainer)",
       {Preset::kHfTrainer, AuxScope::kMicroBatch, 3, 1, 5, true}},
      {Fault::kAutogradAllreduceStats, "autograd_allreduce_stats",
       "statistics all-reduced with torch.distributed.nn.all_reduce, whose backward all-reduces too",
       "pytorch #58005, microsoft/ltp-megatron-lm PR #68; torchtitan spmd comment",
       DiagnosisCode::kAuxGradScaled, "cp", statisticsAllReduced,
       "to aux.type micro_batch or global_batch",
       {Preset::kMegatron, AuxScope::kMicroBatch, 3, 2, 5, true}},
      {Fault::kStaleTokenDenominator, "stale_token_denominator",
       "global aux: counts accumulate over accumulation steps but T comes from the current microbatch",
       "Megatron-LM #7197/#7213", DiagnosisCode::kAuxGradDirection, "", globalScope,
       "to aux.type global_batch", {Preset::kMegatron, AuxScope::kGlobalBatch, 3, 1, 5, true}},
      {Fault::kBatchWiseCountsPerMicrobatch, "batch_wise_counts_per_microbatch",
       "global-batch aux intended, counts taken per microbatch instead of over the batch",
       "torchtitan PR #3000", DiagnosisCode::kAuxGradDirection, "", globalScope,
       "to aux.type global_batch", {Preset::kTorchtitan, AuxScope::kGlobalBatch, 3, 1, 5, true}},
      {Fault::kCoeffAsGate, "coeff_as_gate",
       "aux coefficient used only as a > 0 gate and never multiplied in",
       "NeMo Automodel #1408 item 2 (fixed by PR #1412)", DiagnosisCode::kAuxCoeffNonlinear, "",
       always, "", {Preset::kMegatron, AuxScope::kMicroBatch, 3, 1, 5, true}},
  };
  return faults;
}

const PresetRecord& presetRecord(Preset preset) {
  for (const PresetRecord& p : presetCatalog())
    if (p.id == preset) return p;
  throw std::logic_error("preset without a catalog record");
}

const FaultRecord& faultRecord(Fault fault) {
  for (const FaultRecord& f : faultCatalog())
    if (f.id == fault) return f;
  throw std::logic_error("fault without a catalog record");
}

const char* toString(Preset v) {
  for (const PresetRecord& p : presetCatalog())
    if (p.id == v) return p.name;
  return "invalid";
}

const char* toString(Fault v) {
  for (const FaultRecord& f : faultCatalog())
    if (f.id == v) return f.name;
  return "invalid";
}

std::optional<Preset> presetNamed(const std::string& name) {
  for (const PresetRecord& p : presetCatalog())
    if (name == p.name) return p.id;
  return std::nullopt;
}

std::optional<Fault> faultNamed(const std::string& name) {
  for (const FaultRecord& f : faultCatalog())
    if (name == f.name) return f.id;
  return std::nullopt;
}

std::vector<std::string> presetNames() {
  std::vector<std::string> names;
  for (const PresetRecord& p : presetCatalog()) names.push_back(p.name);
  return names;
}

std::vector<std::string> faultNames() {
  std::vector<std::string> names;
  for (const FaultRecord& f : faultCatalog()) names.push_back(f.name);
  return names;
}

void requireFaultsApply(const Scenario& scenario) {
  const FaultContext context{presetRecord(scenario.framework.preset), scenario};
  for (std::size_t i = 0; i < scenario.faults.size(); ++i) {
    const FaultRecord& fault = faultRecord(scenario.faults[i]);
    if (!fault.applies(context))
      throw InputError(scenario.source_file, "/faults/" + std::to_string(i),
                       fmt::format("fault '{}' applies only {}; the scenario has preset '{}' and aux.type "
                                   "'{}'",
                                   fault.name, fault.applies_to, context.preset.name,
                                   toString(scenario.aux.type)));
  }
}

}  // namespace moe
