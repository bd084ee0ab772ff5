// The preset and fault records. Each cites the public code, issue or PR it follows, so that a
// report can cite it too.
#include "scenario/catalog.hpp"

#include <fmt/format.h>

#include "common/errors.hpp"

namespace moe {

// Megatron-LM: MoELayer.forward raises ValueError in training when TP > 1 without sequence
// parallelism; the router routes its S/(tp*cp) shard, its counts are all-reduced over tp_cp
// (tp_dp_cp for the global aux), and its weight carries sequence_parallel=True, so
// finalize_model_grads._allreduce_non_tensor_model_parallel_grads SUMs its gradient over TP.
constexpr SequenceParallelRule kMegatronSp = SequenceParallelRule::kRequiredWithTp;
constexpr const char* kMegatronParallelSource =
    "Megatron-LM moe_layer.MoELayer.forward (SP required with TP), moe_utils.get_tokens_per_expert_and_token_count "
    "(counts over tp_cp / tp_dp_cp), router.Router.reset_parameters (sequence_parallel: TP SUM in "
    "finalize_model_grads), parallel_state.initialize_model_parallel (EP folded out of tp*cp*dp)";

const std::vector<PresetRecord>& presetCatalog() {
  static const std::vector<PresetRecord> presets = {
      {Preset::kMegatron, "megatron",
       "MoEAuxLossAutoScaler on the routing weights, backward scale cp/M; DDP averages over dp*cp; "
       "main loss mean per microbatch / M",
       "Megatron-LM moe_utils.MoEAuxLossAutoScaler, schedules.forward_step_calc_loss (PR #2237)",
       Injection::kAutoScaler, GradReduction::kMean, MainLossScope::kMicrobatchMean,
       GroupWeighting::kUniform, MainLossNormalization::kCpOverTokensAndM, AutoScalerScale::kCpOverM,
       AuxPremultiplier::kNone, PostReduction::kNone, true,
       "the MoEAuxLossAutoScaler backward scale (schedules.forward_step_calc_loss)", kMegatronSp,
       RouterTokensOverTp::kShardedWithSp, ExpertParallelCarve::kTensorContextData, kMegatronParallelSource,
       {Fault::kGlobalTokenNormalization, Fault::kStaleTokenDenominator, Fault::kZlossLocalShardMean,
        Fault::kSeqAuxMeanValidLength}},
      {Preset::kMegatronPerToken, "megatron_per_token",
       "--calculate-per-token-loss: aux premultiplied by valid tokens*cp, backward scale 1; grads "
       "summed over dp*cp and divided by the global loss-token count in finalize_model_grads",
       "Megatron-LM router.attach_and_log_load_balancing_loss, finalize_model_grads (PR #5047)",
       Injection::kAutoScaler, GradReduction::kSum, MainLossScope::kTokenMean, GroupWeighting::kTokens,
       MainLossNormalization::kNone, AutoScalerScale::kOne, AuxPremultiplier::kGroupTokens,
       PostReduction::kGlobalTokens, false,
       "the MoEAuxLossAutoScaler backward scale (schedules.forward_step_calc_loss)", kMegatronSp,
       RouterTokensOverTp::kShardedWithSp, ExpertParallelCarve::kTensorContextData, kMegatronParallelSource,
       {Fault::kGlobalTokenNormalization, Fault::kStaleTokenDenominator, Fault::kInplaceCountAllreduce,
        Fault::kSeqAuxMeanValidLength}},
      {Preset::kNemoAutomodel, "nemo_automodel",
       "copy of MoEAuxLossAutoScaler, main_loss_backward_scale = cp/M (x num_label_tokens/(dp*cp) "
       "with PP); FSDP averages over dp*cp; main loss sum / global label tokens * dp*cp",
       "NeMo Automodel layers.Gate, BaseRecipe._set_moe_aux_loss_backward_scale (PR #3359)",
       Injection::kAutoScaler, GradReduction::kMean, MainLossScope::kTokenMean,
       GroupWeighting::kUniform, MainLossNormalization::kAutomodelRecipe,
       AutoScalerScale::kAutomodelRecipe, AuxPremultiplier::kNone, PostReduction::kAutomodelPipeline,
       true,
       "MoEAuxLossAutoScaler.main_loss_backward_scale (BaseRecipe._set_moe_aux_loss_backward_scale)",
       SequenceParallelRule::kRefused, RouterTokensOverTp::kReplicated, ExpertParallelCarve::kTensorContextData,
       "NeMo Automodel components/moe/parallelizer._resolve_moe_tp_plan (sequence_parallel refused), "
       "Gate._compute_aux_loss (statistics over cp_mesh only), PR #2995 (the router a TP replica fed identical "
       "tokens, no TP collective), components/distributed/mesh_utils (EP folded from dp*cp*tp)",
       {}},
      {Preset::kTorchtitan, "torchtitan",
       "identity-forward autograd.Function on the scores, coeff/global_valid_tokens applied at "
       "injection; FSDP gradient division disabled (sum over dp)",
       "torchtitan AuxLoss / _AuxLossInjection (PR #3864), disable_fsdp_gradient_division",
       Injection::kIdentityFunction, GradReduction::kSum, MainLossScope::kTokenMean,
       GroupWeighting::kTokens, MainLossNormalization::kOverGlobalTokens, AutoScalerScale::kNotUsed,
       AuxPremultiplier::kTokenShareOfStep, PostReduction::kNone, false,
       "the AuxLoss step denominator (AuxLoss.set_step_denominator)", SequenceParallelRule::kOptional,
       RouterTokensOverTp::kShardedWithEp, ExpertParallelCarve::kTensorContextData,
       "torchtitan models/common/moe_sharding._router_sharding_config (EP on: router input on the "
       "sequence-parallel placement, tokens split over TP; EP off: replicated on TP), "
       "MicrobatchWiseLoadBalanceLoss._reduce_token_partials (statistics over cp, and tp when EP is on, "
       "identity backward), distributed/parallel_dims (EP divides dp_shard*cp*tp), PR #4054 (TP without EP: "
       "the router's main-loss gradient is summed over TP)",
       {Fault::kTpReduceWithoutEp}},
      {Preset::kDeepSpeed, "deepspeed",
       "l_aux returned and added to the loss by the user; engine divides by gradient accumulation "
       "steps and averages over dp",
       "DeepSpeed sharded_moe.topkgating, engine.backward", Injection::kLossAdd, GradReduction::kMean,
       MainLossScope::kMicrobatchMean, GroupWeighting::kUniform,
       MainLossNormalization::kCpOverTokensAndM, AutoScalerScale::kNotUsed, AuxPremultiplier::kCpOverM,
       PostReduction::kNone, true, "the multiplier of the aux term added to the loss", SequenceParallelRule::kRefused,
       RouterTokensOverTp::kReplicated, ExpertParallelCarve::kData,
       "DeepSpeed moe/layer.MOELayer.forward (non-expert TP duplicates tokens: every TP rank routes the same "
       "tokens, l_aux rank-local), utils/groups._get_expert_parallel_ranks (EP inside DP)",
       {Fault::kCountPadding}},
      {Preset::kHfTrainer, "hf_trainer",
       "aux added to the loss inside the model forward (loss += coef*aux); Trainer with "
       "average_tokens_across_devices; aux divided by accumulation steps and kept out of the "
       "world-size multiply (the fix proposed in PRs #48691/#48706)",
       "HF transformers load_balancing_loss_func, Trainer.training_step (#48690)",
       Injection::kLossAdd, GradReduction::kMean, MainLossScope::kTokenMean, GroupWeighting::kUniform,
       MainLossNormalization::kDpCpOverGlobalTokens, AutoScalerScale::kNotUsed,
       AuxPremultiplier::kCpOverM, PostReduction::kNone, true,
       "the multiplier of the aux term added to the loss", SequenceParallelRule::kRefused,
       RouterTokensOverTp::kUnsupported, ExpertParallelCarve::kUnsupported,
       "HF transformers Trainer: no source covers its TP or EP with the MoE aux loss",
       {Fault::kWorldSizeMultiply}},
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
int tensorContext(const FaultContext& c) { return c.scenario.mesh.tp * c.scenario.mesh.cp; }
bool perTokenPremultiplier(const FaultContext& c) { return c.preset.aux_premultiplier == AuxPremultiplier::kGroupTokens; }
bool perTokenShardsWithMask(const FaultContext& c) {
  return perTokenPremultiplier(c) && c.scenario.aux.exclude_padding && tensorContext(c) > 1 &&
         c.scenario.aux.type != AuxScope::kGlobalBatch;
}
bool megatronZLossOverUnevenShards(const FaultContext& c) {
  return c.preset.autoscaler_scale == AutoScalerScale::kCpOverM && c.scenario.aux.z_loss_coeff > 0 &&
         c.scenario.aux.z_loss_scope == ZLossScope::kMicroBatch && c.scenario.aux.exclude_padding &&
         tensorContext(c) > 1;
}
bool megatronSequenceAuxWithMask(const FaultContext& c) {
  return c.preset.router_tokens == RouterTokensOverTp::kShardedWithSp && c.scenario.aux.type == AuxScope::kSequence &&
         c.scenario.aux.exclude_padding;
}
bool perTokenOverTensorContext(const FaultContext& c) {
  return perTokenPremultiplier(c) && tensorContext(c) > 1 && c.scenario.aux.type != AuxScope::kGlobalBatch;
}
bool tokensShardedOverTp(const FaultContext& c) { return routerTokensShardedOverTp(c.scenario); }
bool torchtitanTpWithoutEp(const FaultContext& c) {
  return c.preset.router_tokens == RouterTokensOverTp::kShardedWithEp && c.scenario.mesh.tp > 1 &&
         c.scenario.mesh.ep == 1;
}
bool tokensReplicatedOverTp(const FaultContext& c) {
  return c.scenario.mesh.tp > 1 && c.preset.router_tokens != RouterTokensOverTp::kUnsupported &&
         !routerTokensShardedOverTp(c.scenario);
}
bool expertParallel(const FaultContext& c) { return c.scenario.mesh.ep > 1; }
bool perTokenDivisionUnderCp(const FaultContext& c) {
  return c.preset.post_reduction == PostReduction::kGlobalTokens && c.scenario.mesh.cp > 1;
}

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
      // TP / SP / EP: the t, c, dp and M of the selftest meshes are 4, 2, 3, 5 (all different).
      {Fault::kPerTokenShardCount, "per_token_shard_count",
       "per-token aux premultiplied by the rank's own valid tokens times |tp_cp| (n_r*|tp_cp|, Megatron's "
       "attach_and_log_load_balancing_loss and PR #7481's proposal) instead of the tp_cp group's valid-token "
       "total: exact only when every shard holds the same number of valid tokens; with uneven padding a "
       "direction error",
       "Megatron-LM router.attach_and_log_load_balancing_loss, PR #7481", DiagnosisCode::kAuxGradDirection, "",
       perTokenShardsWithMask,
       "to preset megatron_per_token with aux.exclude_padding (a padding mask), tp*cp > 1 and aux.type "
       "micro_batch or sequence",
       {Preset::kMegatronPerToken, AuxScope::kMicroBatch, 3, 2, 5, true, 4, 1}},
      {Fault::kZlossLocalShardMean, "zloss_local_shard_mean",
       "z-loss under TP/CP is (beta/|tp_cp|) x the mean over the rank's local valid tokens, summed over the "
       "tp_cp ranks: a mean of shard means, not the token mean, when shards hold unequal valid tokens "
       "(measured on Megatron's own TopKRouter: scale 1.0125 and 1.0162, cosine 0.998)",
       "Megatron-LM router.TopKRouter.apply_z_loss, moe_utils.z_loss_func (open)", DiagnosisCode::kAuxGradDirection,
       "", megatronZLossOverUnevenShards,
       "to preset megatron with z_loss_coeff > 0, z_loss_scope micro_batch, aux.exclude_padding and tp*cp > 1",
       {Preset::kMegatron, AuxScope::kMicroBatch, 3, 2, 5, true, 4, 1, 0.01}},
      {Fault::kSeqAuxMeanValidLength, "seq_aux_mean_valid_length",
       "sequence aux loss with a padding mask takes each sequence's T as the mean valid length of the "
       "micro-batch's sequences (sum(counts)/(k*B)), so with unequal padding each sequence's term is weighted "
       "by (T_b/T_mean)^2 (measured on Megatron's own code: cosine 0.81 and 0.87)",
       "Megatron-LM router.TopKRouter._apply_seq_aux_loss (open)", DiagnosisCode::kAuxGradDirection, "",
       megatronSequenceAuxWithMask,
       "to presets megatron and megatron_per_token with aux.type sequence and aux.exclude_padding",
       {Preset::kMegatron, AuxScope::kSequence, 3, 2, 1, true, 4, 1}},
      {Fault::kPerTokenLocalCount, "per_token_local_count",
       "per-token premultiplier of the rank's local token count only (before PR #5047): without a padding "
       "mask aux and z-loss are x 1/(tp*cp); with a mask the in-place count all-reduce makes the aux exact and "
       "only the z-loss stays x 1/(tp*cp) (a direction error when both are on)",
       "Megatron-LM #1652, fixed by PR #5047", DiagnosisCode::kAuxGradScaled, "1/(cp*tp)",
       perTokenOverTensorContext,
       "to preset megatron_per_token with tp*cp > 1 and aux.type micro_batch or sequence",
       {Preset::kMegatronPerToken, AuxScope::kMicroBatch, 3, 2, 5, false, 4, 1, 0.01, false}},
      {Fault::kInplaceCountAllreduce, "inplace_count_allreduce",
       "with a padding mask the in-place all-reduce of the counts makes the 'local' token count the tp_cp "
       "group's: the per-token premultiplier is T_valid*|tp_cp|, aux and sequence aux x tp*cp (a pure scale "
       "even with uneven padding); z-loss unaffected",
       "Megatron-LM #7452 (open), PR #7481", DiagnosisCode::kAuxGradScaled, "cp*tp", perTokenShardsWithMask,
       "to preset megatron_per_token with aux.exclude_padding (a padding mask), tp*cp > 1 and aux.type "
       "micro_batch or sequence",
       {Preset::kMegatronPerToken, AuxScope::kMicroBatch, 3, 2, 5, true, 4, 1}},
      {Fault::kRouterGradNotSummedOverTp, "router_grad_not_summed_over_tp",
       "each TP rank keeps the router gradient of its own tokens (the router weight not synchronised over TP "
       "under sequence parallelism): replicas diverge, each holds a partial",
       "Megatron-LM #599 (PR #619), torchtitan #2387 (fixed by #2416)", DiagnosisCode::kReplicaDivergence, "",
       tokensShardedOverTp, "to meshes whose routers see TP-sharded tokens (megatron with SP, torchtitan with EP)",
       {Preset::kMegatron, AuxScope::kMicroBatch, 3, 2, 5, true, 4, 1}},
      {Fault::kTpReduceWithoutEp, "tp_reduce_without_ep",
       "aux statistics all-reduced over TP while the tokens are replicated on TP (EP off): counts, probability "
       "sums and the token count all grow tp-fold, the loss value is unchanged and each rank's gradient is x 1/tp",
       "torchtitan aux_loss.AuxLoss._reduce_token_partials (indexed 0276e6ed: loops over cp and tp without the "
       "EP check)",
       DiagnosisCode::kAuxGradScaled, "1/tp", torchtitanTpWithoutEp, "to preset torchtitan with tp > 1 and ep 1",
       {Preset::kTorchtitan, AuxScope::kMicroBatch, 3, 2, 5, true, 4, 1}},
      {Fault::kRouterGradSummedOverTpReplicated, "router_grad_summed_over_tp_replicated",
       "the router gradient summed over TP although every TP rank routed the same tokens: x tp",
       "torchtitan _reduce_token_partials variant, measured on PR #3864's loss code (x 2 at tp 2)",
       DiagnosisCode::kAuxGradScaled, "tp", tokensReplicatedOverTp,
       "to meshes whose routers see the same tokens on every TP rank (tp > 1: nemo_automodel, deepspeed, "
       "torchtitan without EP)",
       {Preset::kDeepSpeed, AuxScope::kMicroBatch, 3, 2, 5, true, 4, 1}},
      {Fault::kEpRouterGradLocalSlots, "ep_router_grad_local_slots",
       "under EP each rank's router-score gradient covers only the slots of its local experts and is never "
       "summed: the router's main-loss gradient misses the other experts' share (the aux gradient, which "
       "enters through the probabilities, is unaffected)",
       "HF transformers #48205", DiagnosisCode::kMainGradMismatch, "", expertParallel, "to meshes with ep > 1",
       {Preset::kMegatron, AuxScope::kMicroBatch, 3, 2, 5, true, 4, 2}},
      {Fault::kTpMainGradOneShare, "tp_main_grad_one_share",
       "TP without EP: the router's input-gradient placement defaults to Replicate, so its main-loss gradient "
       "keeps one TP rank's share instead of the sum over TP (grad-norm ratio about sqrt(tp))",
       "torchtitan #4054 (fixed by ecae62f1)", DiagnosisCode::kMainGradMismatch, "", torchtitanTpWithoutEp,
       "to preset torchtitan with tp > 1 and ep 1", {Preset::kTorchtitan, AuxScope::kMicroBatch, 3, 2, 5, true, 4, 1}},
      {Fault::kPerTokenMissingCount, "per_token_missing_count",
       "per-token mode under CP with no token count returned by the loss function: the final division by the "
       "global token count is skipped, every gradient x N_tok",
       "verl #6609 (fixed by #6836)", DiagnosisCode::kAuxGradScaled, "tokens", perTokenDivisionUnderCp,
       "to preset megatron_per_token with cp > 1", {Preset::kMegatronPerToken, AuxScope::kMicroBatch, 3, 2, 5, true, 4, 1}},
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

bool sequenceParallel(const Scenario& scenario) {
  if (scenario.mesh.sequence_parallel) return *scenario.mesh.sequence_parallel;
  return presetRecord(scenario.framework.preset).sequence_parallel == SequenceParallelRule::kRequiredWithTp &&
         scenario.mesh.tp > 1;
}

bool routerTokensShardedOverTp(const Scenario& scenario) {
  if (scenario.mesh.tp <= 1) return false;
  switch (presetRecord(scenario.framework.preset).router_tokens) {
    case RouterTokensOverTp::kShardedWithSp: return sequenceParallel(scenario);
    case RouterTokensOverTp::kShardedWithEp: return scenario.mesh.ep > 1;
    case RouterTokensOverTp::kReplicated:
    case RouterTokensOverTp::kUnsupported: return false;
  }
  return false;
}

void requireMeshSupported(const Scenario& sc) {
  const PresetRecord& p = presetRecord(sc.framework.preset);
  const MeshConfig& m = sc.mesh;
  auto fail = [&](const std::string& path, const std::string& what) {
    throw InputError(sc.source_file, path, fmt::format("{} (preset {}: {})", what, p.name, p.parallel_source));
  };
  if (m.tp > 1 && p.router_tokens == RouterTokensOverTp::kUnsupported)
    fail("/mesh/tp", fmt::format("tp ({}) > 1 is not supported by this preset", m.tp));
  if (m.ep > 1 && p.expert_parallel == ExpertParallelCarve::kUnsupported)
    fail("/mesh/ep", fmt::format("ep ({}) > 1 is not supported by this preset", m.ep));
  if (m.sequence_parallel) {
    if (*m.sequence_parallel && p.sequence_parallel == SequenceParallelRule::kRefused)
      fail("/mesh/sequence_parallel", "sequence_parallel true is refused by this framework");
    if (!*m.sequence_parallel && m.tp > 1 && p.sequence_parallel == SequenceParallelRule::kRequiredWithTp)
      fail("/mesh/sequence_parallel",
           fmt::format("sequence_parallel false with tp ({}) > 1 is refused, as the framework refuses MoE training "
                       "with TP but without sequence parallelism",
                       m.tp));
  }
  if (m.ep > 1) {
    const long long block = p.expert_parallel == ExpertParallelCarve::kData ? m.dp : 1ll * m.tp * m.cp * m.dp;
    if (block % m.ep != 0)
      fail("/mesh/ep", fmt::format("ep ({}) must divide {} ({}): EP is carved out of the ranks that are already there",
                                   m.ep, p.expert_parallel == ExpertParallelCarve::kData ? "dp" : "tp*cp*dp", block));
    if (sc.model.experts % m.ep != 0)
      fail("/mesh/ep", fmt::format("ep ({}) must divide experts ({}): every EP rank holds the same number of experts",
                                   m.ep, sc.model.experts));
  }
  if (routerTokensShardedOverTp(sc) && sc.data.seq_len % (m.cp * m.tp) != 0)
    fail("/data/seq_len", fmt::format("seq_len ({}) must be divisible by cp*tp ({}*{}): every TP rank routes an "
                                      "equal shard of its CP chunk",
                                      sc.data.seq_len, m.cp, m.tp));
  if (m.tp > 1 && p.router_tokens == RouterTokensOverTp::kShardedWithEp && m.ep == 1 && sc.model.ffn % m.tp != 0)
    fail("/model/ffn", fmt::format("ffn ({}) must be divisible by tp ({}): without EP the experts are split over TP "
                                   "along the FFN dimension",
                                   sc.model.ffn, m.tp));
}

OpenBugs openBugsFor(const Scenario& scenario) {
  const PresetRecord& preset = presetRecord(scenario.framework.preset);
  const FaultContext context{preset, scenario};
  OpenBugs bugs;
  for (Fault f : preset.open_bugs) {
    const FaultRecord& record = faultRecord(f);
    if (record.applies(context)) bugs.applied.push_back(f);
    else bugs.skipped.push_back({f, std::string("applies only ") + record.applies_to});
  }
  return bugs;
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
