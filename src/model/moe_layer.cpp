#include "model/moe_layer.hpp"

namespace moe {

at::ScalarType torchDType(DType dtype) {
  switch (dtype) {
    case DType::kFloat64: return at::kDouble;
    case DType::kFloat32: return at::kFloat;
    case DType::kBFloat16: return at::kBFloat16;
  }
  return at::kDouble;
}

Routing routeTokens(const at::Tensor& h, const at::Tensor& router_weight, const ModelConfig& model) {
  Routing r;
  r.logits = h.mm(router_weight);
  if (model.score == ScoreFunction::kSoftmax) {
    r.scores = torch::softmax(r.logits, /*dim=*/1);
    r.aux_probs = r.scores;
  } else {
    r.scores = torch::sigmoid(r.logits);
    r.aux_probs = r.scores / r.scores.sum(/*dim=*/1, /*keepdim=*/true);
  }
  // A stable descending sort keeps the lower expert index first among equal scores.
  const auto sorted = std::get<1>(torch::sort(r.scores.detach(), /*stable=*/true, /*dim=*/1,
                                              /*descending=*/true));
  r.topk = sorted.narrow(1, 0, model.top_k).contiguous();
  r.gates = r.scores.gather(1, r.topk);
  if (model.norm_topk_prob) r.gates = r.gates / r.gates.sum(/*dim=*/1, /*keepdim=*/true);
  return r;
}

at::Tensor expertCounts(const at::Tensor& topk, const at::Tensor& token_mask, int experts) {
  at::Tensor selected = topk.index({token_mask});  // [n_sel, k]
  return torch::bincount(selected.reshape({-1}), /*weights=*/{}, experts).to(at::kDouble);
}

at::Tensor applyExperts(const at::Tensor& h, const at::Tensor& topk, const at::Tensor& gates,
                        const LayerWeights& w) {
  return h + expertOutput(h, topk, gates, w);
}

at::Tensor expertOutput(const at::Tensor& h, const at::Tensor& topk, const at::Tensor& gates,
                        const LayerWeights& w) {
  const int64_t experts = w.expert_in.size(0);
  at::Tensor out = torch::zeros_like(h);
  for (int64_t e = 0; e < experts; ++e) {
    const at::Tensor hit = (topk == e);            // [n, k]
    const at::Tensor rows = hit.any(1).nonzero().squeeze(1);
    if (rows.numel() == 0) continue;
    const at::Tensor gate = (gates.index_select(0, rows) * hit.index_select(0, rows)).sum(1, true);
    const at::Tensor hidden = torch::tanh(h.index_select(0, rows).mm(w.expert_in[e]));
    out = out.index_add(0, rows, gate * hidden.mm(w.expert_out[e]));
  }
  return out;
}

namespace {

struct AuxLossAutoScaler : public torch::autograd::Function<AuxLossAutoScaler> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, at::Tensor output,
                            at::Tensor aux_loss, double backward_scale) {
    ctx->saved_data["scale"] = backward_scale;
    ctx->saved_data["aux_options_dtype"] = static_cast<int64_t>(aux_loss.scalar_type());
    return output;
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grad_outputs) {
    const double scale = ctx->saved_data["scale"].toDouble();
    const auto dtype = static_cast<at::ScalarType>(ctx->saved_data["aux_options_dtype"].toInt());
    at::Tensor aux_grad = torch::full({}, scale, at::TensorOptions().dtype(dtype));
    return {grad_outputs[0], aux_grad, at::Tensor()};
  }
};

}  // namespace

at::Tensor attachAuxLoss(const at::Tensor& output, const at::Tensor& aux_loss, double backward_scale) {
  return AuxLossAutoScaler::apply(output, aux_loss, backward_scale);
}

at::Tensor logsumexpRows(const at::Tensor& logits) { return torch::logsumexp(logits, /*dim=*/1); }

}  // namespace moe
