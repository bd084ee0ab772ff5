// Presets follow ../shared/ANCHORS.md §1–§5; faults follow its §7 signature table. Each entry names
// the public issue or PR it reproduces so a report can cite it.
#include "scenario/catalog.hpp"

namespace moe {

const std::vector<PresetInfo>& presetCatalog() {
  static const std::vector<PresetInfo> presets = {
      {"megatron",
       "MoEAuxLossAutoScaler on the routing weights, backward scale cp/M; DDP averages over dp*cp; "
       "main loss mean per microbatch / M",
       "Megatron-LM moe_utils.MoEAuxLossAutoScaler, schedules.forward_step_calc_loss (PR #2237)",
       MainLossScope::kMicrobatchMean, GroupWeighting::kUniform},
      {"megatron_per_token",
       "--calculate-per-token-loss: aux premultiplied by valid tokens*cp, backward scale 1; grads "
       "summed over dp*cp and divided by the global loss-token count in finalize_model_grads",
       "Megatron-LM router.attach_and_log_load_balancing_loss, finalize_model_grads (PR #5047)",
       MainLossScope::kTokenMean, GroupWeighting::kTokens},
      {"nemo_automodel",
       "copy of MoEAuxLossAutoScaler, main_loss_backward_scale = cp/M (x num_label_tokens/(dp*cp) "
       "with PP); FSDP averages over dp*cp; main loss sum / global label tokens * dp*cp",
       "NeMo Automodel layers.Gate, BaseRecipe._set_moe_aux_loss_backward_scale (PR #3359)",
       MainLossScope::kTokenMean, GroupWeighting::kUniform},
      {"torchtitan",
       "identity-forward autograd.Function on the scores, coeff/global_valid_tokens applied at "
       "injection; FSDP gradient division disabled (sum over dp)",
       "torchtitan AuxLoss / _AuxLossInjection (PR #3864), disable_fsdp_gradient_division",
       MainLossScope::kTokenMean, GroupWeighting::kTokens},
      {"deepspeed",
       "l_aux returned and added to the loss by the user; engine divides by gradient accumulation "
       "steps and averages over dp",
       "DeepSpeed sharded_moe.topkgating, engine.backward", MainLossScope::kMicrobatchMean, GroupWeighting::kUniform},
      {"hf_trainer",
       "aux added to the loss inside the model forward (loss += coef*aux); Trainer with "
       "average_tokens_across_devices; aux divided by accumulation steps and kept out of the "
       "world-size multiply (the fix proposed in PRs #48691/#48706)",
       "HF transformers load_balancing_loss_func, Trainer.training_step (#48690)",
       MainLossScope::kTokenMean, GroupWeighting::kUniform},
  };
  return presets;
}

const std::vector<FaultInfo>& faultCatalog() {
  static const std::vector<FaultInfo> faults = {
      {"discard_apply_return",
       "MoEAuxLossAutoScaler.apply() return value discarded: the injection never joins the graph",
       "NeMo Automodel #1408 (fixed by PR #1412)", "AUX_GRAD_MISSING", "0"},
      {"missing_backward_scale",
       "main_loss_backward_scale never set (stays 1) while DP averaging and PP rescaling still apply (with PP the factor is dp*M/tokens)",
       "NeMo Automodel #1408 (fixed by PR #1412)", "AUX_GRAD_SCALED", "M/cp"},
      {"accumulation_overweight",
       "backward scale without the / M of gradient accumulation: the aux gradient is summed over microbatches (the over-weighting PR #3359 removed from PR #1412's scale)",
       "NeMo Automodel between PR #1412 and PR #3359", "AUX_GRAD_SCALED", "M"},
      {"global_token_normalization",
       "global aux loss divided by the global token count while probs stay local",
       "Megatron-LM #3672", "AUX_GRAD_SCALED", "1/dp"},
      {"missing_cp_scale",
       "backward scale lacks x cp although each CP rank holds a partial aux loss and DDP averages "
       "over dp*cp",
       "Megatron-LM #1652 (fixed by PR #2237)", "AUX_GRAD_SCALED", "1/cp"},
      {"seq_aux_missing_mbs",
       "sequence aux loss in per-token mode premultiplied by valid tokens without x micro-batch size",
       "Megatron-LM #5798", "AUX_GRAD_SCALED", "1/mbs"},
      {"count_padding",
       "padding tokens counted in f and P of the aux loss",
       "Megatron-LM #1982/#1984 (fixed by PR #2121)", "AUX_GRAD_DIRECTION", ""},
      {"world_size_multiply",
       "Trainer multiplies the whole loss, aux included, by the world size before DDP averaging",
       "HF transformers #48690", "AUX_GRAD_SCALED", "dp"},
      {"autograd_allreduce_stats",
       "statistics all-reduced with torch.distributed.nn.all_reduce, whose backward all-reduces too",
       "pytorch #58005, microsoft/ltp-megatron-lm PR #68; torchtitan spmd comment",
       "AUX_GRAD_SCALED", "cp"},
      {"stale_token_denominator",
       "global aux: counts accumulate over accumulation steps but T comes from the current microbatch",
       "Megatron-LM #7197/#7213", "AUX_GRAD_DIRECTION", ""},
      {"batch_wise_counts_per_microbatch",
       "global-batch aux intended, counts taken per microbatch instead of over the batch",
       "torchtitan PR #3000", "AUX_GRAD_DIRECTION", ""},
      {"coeff_as_gate",
       "aux coefficient used only as a > 0 gate and never multiplied in",
       "NeMo Automodel #1408 item 2 (fixed by PR #1412)", "AUX_COEFF_NONLINEAR", ""},
  };
  return faults;
}

const PresetInfo* findPreset(const std::string& name) {
  for (const auto& p : presetCatalog())
    if (p.name == name) return &p;
  return nullptr;
}

const FaultInfo* findFault(const std::string& name) {
  for (const auto& f : faultCatalog())
    if (f.name == name) return &f;
  return nullptr;
}

}  // namespace moe
