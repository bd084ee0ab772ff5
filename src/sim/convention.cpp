// Scaling rules of the presets, one per rule kind of the catalog records. Notation: dp, cp, M =
// microbatches per replica, T_mb = loss tokens of a microbatch, T_G = aux tokens of the aux group, N
// = loss tokens of the global batch. "Partial aux" is one CP rank's share of a group's loss: the
// shares sum over CP to the group loss because counts are all-reduced and the loss is linear in P
// (Megatron switch_load_balancing_loss_func docstring).
#include "sim/convention.hpp"

namespace moe {

double Convention::mainLossMultiplier(const ScaleInputs& in) const {
  const MeshSizes& m = in.mesh;
  switch (preset->main_loss) {
    case MainLossNormalization::kCpOverTokensAndM:
      // Megatron schedules.forward_step: loss / num_tokens * cp / num_microbatches, with the loss sum
      // and token count all-reduced over CP in loss_func; DDP then averages over dp*cp. DeepSpeed:
      // mean per microbatch, engine divides by gradient_accumulation_steps, DP average.
      return m.cp / (in.microbatch_valid_tokens * m.microbatches);
    case MainLossNormalization::kNone:
      return 1.0;  // summed; finalize_model_grads divides by N (Megatron per-token mode)
    case MainLossNormalization::kAutomodelRecipe:
      // Automodel: sum / num_label_tokens * |dp_cp| before backward (FSDP averages over dp_cp);
      // with PP the loss is a plain sum and scale_grads_and_clip_grad_norm divides afterwards.
      return m.pp > 1 ? 1.0 : m.dp * m.cp / in.global_valid_tokens;
    case MainLossNormalization::kDpCpOverGlobalTokens:
      // HF: model loss = sum / num_items_in_batch; the Trainer multiplies by the world size when
      // average_tokens_across_devices is on, DDP averages.
      return m.dp * m.cp / in.global_valid_tokens;
    case MainLossNormalization::kOverGlobalTokens:
      return 1.0 / in.global_valid_tokens;  // torchtitan: local_sum / global_valid_tokens
  }
  return 1.0;
}

double Convention::auxBackwardScale(const ScaleInputs& in) const {
  if (injection() != Injection::kAutoScaler) return 1.0;
  if (has(Fault::kMissingBackwardScale)) return 1.0;  // Automodel #1408: the scale is never set
  const MeshSizes& m = in.mesh;
  double scale = 1.0;
  switch (preset->autoscaler_scale) {
    case AutoScalerScale::kCpOverM:
      // schedules.forward_step_calc_loss: loss_scale * cp_size / num_microbatches (PR #2237); before
      // it, 1 / M (Megatron #1652).
      scale = has(Fault::kMissingCpScale) ? 1.0 / m.microbatches : m.cp / double(m.microbatches);
      break;
    case AutoScalerScale::kOne:
      scale = 1.0;  // per-token mode: loss_scale only
      break;
    case AutoScalerScale::kAutomodelRecipe:
      // BaseRecipe._set_moe_aux_loss_backward_scale (PR #3359): cp / M, and with PP
      // x num_label_tokens / |dp_cp| to undo scale_grads_and_clip_grad_norm.
      scale = m.cp / double(m.microbatches);
      if (m.pp > 1) scale *= in.global_valid_tokens / (m.dp * m.cp);
      if (has(Fault::kMissingCpScale)) scale /= m.cp;
      break;
    case AutoScalerScale::kNotUsed:
      break;
  }
  // Automodel between PR #1412 and PR #3359: the scale ignored gradient accumulation (no / M).
  if (has(Fault::kAccumulationOverweight)) scale *= m.microbatches;
  return scale;
}

double Convention::auxValueMultiplier(const ScaleInputs& in, AuxScope scope) const {
  const MeshSizes& m = in.mesh;
  double mult = 1.0;
  if (scope == AuxScope::kGlobalBatch && !has(Fault::kGlobalTokenNormalization)) {
    // A global-batch partial is divided by the global token count while its probabilities are
    // local, so the partials sum over dp*cp to the global loss; the DP averaging then needs x dp
    // (the correction proposed for Megatron-LM #3672, PRs #3768/#3769).
    if (gradReduction() == GradReduction::kMean) mult *= m.dp;
  }
  // A global-batch partial of one microbatch is a share of the whole step's loss; conventions that
  // divide every microbatch by M (main loss / num_microbatches) need it back.
  if (scope == AuxScope::kGlobalBatch && preset->divides_by_microbatches) mult *= m.microbatches;
  switch (preset->aux_premultiplier) {
    case AuxPremultiplier::kGroupTokens: {
      // attach_and_log_load_balancing_loss premultiplies by valid_token_count * |tp_cp|: as intended,
      // the tp_cp group's tokens (exact for uneven shards too); for sequence aux the micro-batch's
      // tokens: x micro-batch size (Megatron #5798 fix).
      const double tensor_context = double(m.tp) * m.cp;
      if (scope == AuxScope::kGlobalBatch) {
        mult *= in.global_valid_tokens;
      } else if (has(Fault::kPerTokenShardCount)) {
        mult *= in.local_aux_tokens * tensor_context;  // n_r * |tp_cp| (PR #7481's proposal)
      } else if (has(Fault::kPerTokenLocalCount) && !in.exclude_padding) {
        mult *= in.local_aux_tokens;  // before PR #5047 without a padding mask: n_r alone
      } else {
        mult *= in.group_aux_tokens;
        // #7452: with a padding mask the in-place all-reduce makes the "local" count the group's.
        if (has(Fault::kInplaceCountAllreduce)) mult *= tensor_context;
      }
      if (scope == AuxScope::kSequence && has(Fault::kSeqAuxMissingMbs)) mult /= in.micro_batch_size;
      break;
    }
    case AuxPremultiplier::kTokenShareOfStep:
      // AuxLoss.inject: raw_sum * coeff / global_valid_tokens with raw_sum = T_G * L (token mode); a
      // global-batch partial already carries its 1 / T_global.
      if (scope != AuxScope::kGlobalBatch) mult *= in.group_aux_tokens / in.global_valid_tokens;
      break;
    case AuxPremultiplier::kCpOverM:
      // Added to the loss the way the main loss is normalized: DeepSpeed divides by GA steps (and the
      // partial needs x cp under the dp*cp average, like Megatron); HF divides by GA steps and keeps
      // the aux term out of the world-size multiply (fix proposed for HF #48690).
      mult *= double(m.cp) / m.microbatches;
      if (has(Fault::kWorldSizeMultiply)) mult *= m.dp * m.cp;  // HF #48690: Trainer x world size
      break;
    case AuxPremultiplier::kNone:
      break;
  }
  return mult;
}

double Convention::zLossMultiplier(const ScaleInputs& in, AuxScope scope) const {
  // Megatron computes the z-loss partial as (beta/|tp_cp|) x the local token mean, so a per-token
  // premultiplier of n_r * |tp_cp| is exact for it whatever the shards hold; the aux premultiplier
  // faults do not reach it, except the one before PR #5047, which premultiplied it by n_r alone:
  // x 1/|tp_cp| whether or not a padding mask is passed.
  Convention plain = *this;
  for (Fault f : {Fault::kPerTokenShardCount, Fault::kPerTokenLocalCount, Fault::kInplaceCountAllreduce})
    plain.faults.erase(f);
  double mult = plain.auxValueMultiplier(in, scope);
  if (has(Fault::kPerTokenLocalCount) && scope != AuxScope::kGlobalBatch) mult /= double(in.mesh.tp) * in.mesh.cp;
  return mult;
}

double Convention::postReductionScale(const ScaleInputs& in) const {
  const MeshSizes& m = in.mesh;
  switch (preset->post_reduction) {
    case PostReduction::kGlobalTokens:
      // Megatron finalize_model_grads (per-token mode): every gradient / the global loss-token count;
      // verl #6609: with no token count returned the division is skipped.
      if (has(Fault::kPerTokenMissingCount)) return 1.0;
      return 1.0 / in.global_valid_tokens;
    case PostReduction::kAutomodelPipeline:
      // Automodel scale_grads_and_clip_grad_norm under PP: / (num_label_tokens / |dp_cp|).
      return m.pp > 1 ? m.dp * m.cp / in.global_valid_tokens : 1.0;
    case PostReduction::kNone:
      return 1.0;
  }
  return 1.0;
}

Convention conventionFor(const Scenario& sc) {
  requireFaultsApply(sc);  // the rule validate applies: a fault that cannot act is refused
  Convention c;
  c.preset = &presetRecord(sc.framework.preset);
  c.faults.insert(sc.faults.begin(), sc.faults.end());
  return c;
}

}  // namespace moe
