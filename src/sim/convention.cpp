// Scaling rules of each preset, from ../shared/ANCHORS.md. Notation: dp, cp, M = microbatches per
// replica, T_mb = loss tokens of a microbatch, T_G = aux tokens of the aux group, N = loss tokens of
// the global batch. "Partial aux" is one CP rank's share of a group's loss: the shares sum over CP to
// the group loss because counts are all-reduced and the loss is linear in P (ANCHORS §0).
#include "sim/convention.hpp"

#include "common/errors.hpp"
#include "scenario/catalog.hpp"

namespace moe {

double Convention::mainLossMultiplier(const ScaleInputs& in) const {
  if (preset == "megatron" || preset == "deepspeed") {
    // Megatron schedules.forward_step: loss / num_tokens * cp / num_microbatches, with the loss sum
    // and token count all-reduced over CP in loss_func; DDP then averages over dp*cp.
    // DeepSpeed: mean per microbatch, engine divides by gradient_accumulation_steps, DP average.
    return in.cp / (in.microbatch_valid_tokens * in.microbatches);
  }
  if (preset == "megatron_per_token") return 1.0;  // summed; finalize_model_grads divides by N
  if (preset == "nemo_automodel") {
    // Automodel: sum / num_label_tokens * |dp_cp| before backward (FSDP averages over dp_cp);
    // with PP the loss is a plain sum and scale_grads_and_clip_grad_norm divides afterwards.
    return in.pp > 1 ? 1.0 : in.dp * in.cp / in.global_valid_tokens;
  }
  if (preset == "torchtitan") return 1.0 / in.global_valid_tokens;  // local_sum / global_valid_tokens
  if (preset == "hf_trainer") {
    // HF: model loss = sum / num_items_in_batch; Trainer multiplies by the world size when
    // average_tokens_across_devices is on, DDP averages.
    return in.dp * in.cp / in.global_valid_tokens;
  }
  return 1.0;
}

double Convention::auxBackwardScale(const ScaleInputs& in, AuxScope scope) const {
  if (injection != Injection::kAutoScaler) return 1.0;
  if (has("missing_backward_scale")) return 1.0;  // Automodel #1408: scale never set
  double scale = 1.0;
  if (preset == "megatron") {
    // schedules.forward_step_calc_loss: loss_scale * cp_size / num_microbatches (PR #2237).
    scale = in.cp / double(in.microbatches);
    if (has("missing_cp_scale")) scale = 1.0 / in.microbatches;  // Megatron #1652 before #2237
  } else if (preset == "megatron_per_token") {
    scale = 1.0;  // per-token mode: loss_scale only
  } else if (preset == "nemo_automodel") {
    // BaseRecipe._set_moe_aux_loss_backward_scale (PR #3359): cp / M, and with PP
    // x num_label_tokens / |dp_cp| to undo scale_grads_and_clip_grad_norm.
    scale = in.cp / double(in.microbatches);
    if (in.pp > 1) scale *= in.global_valid_tokens / (in.dp * in.cp);
    if (has("missing_cp_scale")) scale /= in.cp;
  }
  // Automodel between PR #1412 and PR #3359: the scale ignored gradient accumulation (no / M).
  if (has("accumulation_overweight")) scale *= in.microbatches;
  return scale;
}

double Convention::auxValueMultiplier(const ScaleInputs& in, AuxScope scope) const {
  double mult = 1.0;
  if (scope == AuxScope::kGlobalBatch && !has("global_token_normalization")) {
    // A global-batch partial is divided by the global token count while its probabilities are
    // local, so the partials sum over dp*cp to the global loss; the DP averaging then needs x dp
    // (the correction proposed for Megatron-LM #3672, PRs #3768/#3769).
    if (grad_reduction == GradReduction::kMean) mult *= in.dp;
  }
  // A global-batch partial of one microbatch is a share of the whole step's loss; conventions that
  // divide every microbatch by M (main loss / num_microbatches) need it back.
  if (scope == AuxScope::kGlobalBatch && dividesByMicrobatches()) mult *= in.microbatches;
  if (preset == "megatron_per_token") {
    // attach_and_log_load_balancing_loss premultiplies by valid_token_count * |tp_cp| (the group's
    // tokens); for sequence aux by the micro-batch's tokens: x micro-batch size (Megatron #5798 fix).
    if (scope == AuxScope::kGlobalBatch) mult *= in.global_valid_tokens;
    else mult *= in.group_aux_tokens;
    if (scope == AuxScope::kSequence && has("seq_aux_missing_mbs")) mult /= in.micro_batch_size;
  } else if (preset == "torchtitan") {
    // AuxLoss.inject: raw_sum * coeff / global_valid_tokens with raw_sum = T_G * L (token mode); a
    // global-batch partial already carries its 1 / T_global.
    if (scope != AuxScope::kGlobalBatch) mult *= in.group_aux_tokens / in.global_valid_tokens;
  } else if (injection == Injection::kLossAdd) {
    // Added to the loss the way the main loss is normalized: DeepSpeed divides by GA steps (and the
    // partial needs x cp under the dp*cp average, like Megatron); HF divides by GA steps and keeps
    // the aux term out of the world-size multiply (fix proposed for HF #48690).
    mult *= double(in.cp) / in.microbatches;
    if (has("world_size_multiply")) mult *= in.dp * in.cp;  // HF #48690: Trainer x world size
  }
  return mult;
}

double Convention::postReductionScale(const ScaleInputs& in) const {
  // Megatron finalize_model_grads (per-token mode): every gradient / the global loss-token count.
  if (preset == "megatron_per_token") return 1.0 / in.global_valid_tokens;
  // Automodel scale_grads_and_clip_grad_norm under PP: / (num_label_tokens / |dp_cp|).
  if (preset == "nemo_automodel" && in.pp > 1) return in.dp * in.cp / in.global_valid_tokens;
  return 1.0;
}

namespace {

// A fault that the scenario's preset or aux scope cannot express would silently do nothing; refuse it.
void requireFaultApplies(const Scenario& sc, const Convention& c, size_t index) {
  const std::string& f = sc.faults[index];
  const std::string path = "/faults/" + std::to_string(index);
  auto require = [&](bool ok, const std::string& what) {
    if (!ok) throw InputError(sc.source_file, path, "fault '" + f + "' applies only " + what);
  };
  const bool autoscaler = c.injection == Injection::kAutoScaler;
  const bool global = sc.aux.type == AuxScope::kGlobalBatch;
  if (f == "missing_backward_scale" || f == "accumulation_overweight")
    require(autoscaler, "to presets that inject with MoEAuxLossAutoScaler (megatron, "
                        "megatron_per_token, nemo_automodel)");
  if (f == "missing_cp_scale")
    require(c.preset == "megatron" || c.preset == "nemo_automodel",
            "to presets whose backward scale carries x cp (megatron, nemo_automodel)");
  if (f == "global_token_normalization")
    require(global && c.grad_reduction == GradReduction::kMean,
            "to aux.type global_batch with a DP-averaging preset (megatron, nemo_automodel, "
            "deepspeed, hf_trainer)");
  if (f == "seq_aux_missing_mbs")
    require(c.preset == "megatron_per_token" && sc.aux.type == AuxScope::kSequence,
            "to preset megatron_per_token with aux.type sequence");
  if (f == "world_size_multiply")
    require(c.injection == Injection::kLossAdd, "to loss-add presets (deepspeed, hf_trainer)");
  if (f == "autograd_allreduce_stats")
    require(sc.aux.type != AuxScope::kSequence, "to aux.type micro_batch or global_batch");
  if (f == "stale_token_denominator" || f == "batch_wise_counts_per_microbatch")
    require(global, "to aux.type global_batch");
}

}  // namespace

Convention conventionFor(const Scenario& sc) {
  Convention c;
  c.preset = sc.framework.preset;
  c.faults.insert(sc.faults.begin(), sc.faults.end());
  if (c.preset == "megatron" || c.preset == "nemo_automodel") {
    c.injection = Injection::kAutoScaler;
    c.grad_reduction = GradReduction::kMean;
  } else if (c.preset == "megatron_per_token") {
    c.injection = Injection::kAutoScaler;
    c.grad_reduction = GradReduction::kSum;  // DDP does no averaging; finalize divides by N
  } else if (c.preset == "torchtitan") {
    c.injection = Injection::kIdentityFunction;
    c.grad_reduction = GradReduction::kSum;  // disable_fsdp_gradient_division
  } else if (c.preset == "deepspeed" || c.preset == "hf_trainer") {
    c.injection = Injection::kLossAdd;
    c.grad_reduction = GradReduction::kMean;
  } else {
    throw InputError(sc.source_file, "/framework/preset", "unknown preset '" + c.preset + "'");
  }
  for (size_t i = 0; i < sc.faults.size(); ++i) requireFaultApplies(sc, c, i);
  return c;
}

}  // namespace moe
