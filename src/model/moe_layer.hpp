// The MoE router layer in LibTorch (logits z = h W, softmax or sigmoid scores, top-k, tanh experts), split into the steps a framework takes, so that a
// convention (src/sim/convention.hpp) can place its collectives, injections and faults between them.
#pragma once

#include <torch/torch.h>

#include "scenario/scenario.hpp"

namespace moe {

// Weights of one layer as the simulation holds them. Only the router weight takes gradients.
struct LayerWeights {
  at::Tensor router_weight;  // [H, E], requires_grad
  at::Tensor expert_in;      // [E, H, F]
  at::Tensor expert_out;     // [E, F, H]
};

// The routing decision of one layer for a shard of tokens.
struct Routing {
  at::Tensor logits;     // [n, E] z = h W
  at::Tensor scores;     // [n, E] softmax(z) or sigmoid(z)
  at::Tensor aux_probs;  // [n, E] p: softmax(z), or s / sum_e s for sigmoid 
  at::Tensor topk;       // [n, k] int64, expert indices, descending score, ties -> lower index
  at::Tensor gates;      // [n, k] top-k scores, renormalized when norm_topk_prob
};

// logits -> scores -> top-k -> gate weights (Megatron compute_routing_scores_for_aux_loss
// for the sigmoid normalization without its 1e-20 epsilon).
Routing routeTokens(const at::Tensor& h, const at::Tensor& router_weight, const ModelConfig& model);

// Per-expert routed-token counts of the rows selected by `token_mask` ([n] bool): [E], no gradient.
at::Tensor expertCounts(const at::Tensor& topk, const at::Tensor& token_mask, int experts);

// sum_{e in topk} g_e tanh(h A_e) B_e: the experts' contribution (their output without the residual).
at::Tensor expertOutput(const at::Tensor& h, const at::Tensor& topk, const at::Tensor& gates,
                        const LayerWeights& weights);

// h + expertOutput(h, topk, gates, weights).
at::Tensor applyExperts(const at::Tensor& h, const at::Tensor& topk, const at::Tensor& gates,
                        const LayerWeights& weights);

// Megatron-LM MoEAuxLossAutoScaler (moe_utils.py), as copied by NeMo Automodel: identity on
// `output` in forward; in backward it passes grad_output through and gives `aux_loss` the gradient
// ones * backward_scale, which autograd then propagates into the router. Megatron keeps the scale in a
// class-static tensor (set_loss_scale); here it is an argument because emulated ranks share a process.
// The caller must use the returned tensor: discarding it is NeMo Automodel bug #1408.
at::Tensor attachAuxLoss(const at::Tensor& output, const at::Tensor& aux_loss, double backward_scale);

// Row-wise logsumexp of the logits, the z-loss statistic (ST-MoE; Megatron z_loss_func).
at::Tensor logsumexpRows(const at::Tensor& logits);

at::ScalarType torchDType(DType dtype);

}  // namespace moe
