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


namespace {

// The (token, slot) pairs of each expert, the dispatch plan of one expertOutput call: `order` holds the
// flat indices t*k + s sorted by expert (stable, so each expert's tokens stay in increasing order) and
// expert e owns order[offsets[e], offsets[e+1]).
struct ExpertDispatch {
  at::Tensor order;
  std::vector<int64_t> offsets;
};

ExpertDispatch planDispatch(const at::Tensor& topk, int64_t experts) {
  const at::Tensor flat = topk.reshape({-1});
  ExpertDispatch plan;
  plan.order = std::get<1>(torch::sort(flat, /*stable=*/true, /*dim=*/0, /*descending=*/false));
  const at::Tensor counts = torch::bincount(flat, /*weights=*/{}, experts).to(at::kCPU, at::kLong).contiguous();
  plan.offsets.assign(experts + 1, 0);
  const int64_t* c = counts.data_ptr<int64_t>();
  for (int64_t e = 0; e < experts; ++e) plan.offsets[e + 1] = plan.offsets[e] + c[e];
  return plan;
}

// [h_t +] sum_{e in topk(t)} g_{t,e} tanh(h_t A_e) B_e with a hand-written backward (for h and the gates; the
// expert weights are constants of the check). Autograd over the per-expert gathers would keep every
// expert's [rows, H] input and output for backward and accumulate into full [n, H] copies, 2k times the
// activations per layer; this keeps h, the gates and the [n k, F] hidden activations only, and adds
// each expert's rows in place (onto a copy of h when `residual`: the layer's output without another
// [n, H] temporary). The experts are added in index order, token rows in increasing order.
struct ExpertFfn : public torch::autograd::Function<ExpertFfn> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, at::Tensor h, at::Tensor gates,
                            at::Tensor topk, at::Tensor expert_in, at::Tensor expert_out, bool residual) {
    TORCH_CHECK(!expert_in.requires_grad() && !expert_out.requires_grad(),
                "expertOutput: expert weights are constants (no gradient is computed for them)");
    const int64_t experts = expert_in.size(0), k = topk.size(1), F = expert_in.size(2);
    const ExpertDispatch plan = planDispatch(topk, experts);
    const at::Tensor gates_flat = gates.reshape({-1});
    at::Tensor out = residual ? h.clone() : torch::zeros_like(h);
    at::Tensor hidden_sorted = torch::empty({plan.order.size(0), F}, h.options());
    for (int64_t e = 0; e < experts; ++e) {
      const int64_t begin = plan.offsets[e], count = plan.offsets[e + 1] - begin;
      if (count == 0) continue;
      const at::Tensor pairs = plan.order.narrow(0, begin, count);
      const at::Tensor rows = pairs.div(k, "floor");
      const at::Tensor gate = gates_flat.index_select(0, pairs).unsqueeze(1);
      const at::Tensor hidden = torch::tanh(h.index_select(0, rows).mm(expert_in[e]));
      hidden_sorted.narrow(0, begin, count).copy_(hidden);
      out.index_add_(0, rows, gate * hidden.mm(expert_out[e]));
    }
    ctx->save_for_backward({gates, plan.order, hidden_sorted, expert_in, expert_out});
    ctx->saved_data["offsets"] = plan.offsets;
    ctx->saved_data["h_needs_grad"] = h.requires_grad();
    ctx->saved_data["residual"] = residual;
    ctx->saved_data["tokens"] = h.size(0);
    return out;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grad_outputs) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &gates = saved[0], &order = saved[1], &hidden_sorted = saved[2], &expert_in = saved[3],
                     &expert_out = saved[4];
    const std::vector<int64_t> offsets = ctx->saved_data["offsets"].toIntVector();
    const bool h_needs_grad = ctx->saved_data["h_needs_grad"].toBool();
    const int64_t n = ctx->saved_data["tokens"].toInt(), k = gates.size(1);
    const at::Tensor& grad_out = grad_outputs[0];
    // d(h + experts)/dh = identity + the experts' part.
    at::Tensor grad_h;
    if (h_needs_grad)
      grad_h = ctx->saved_data["residual"].toBool() ? grad_out.clone()
                                                   : torch::zeros({n, expert_in.size(1)}, grad_out.options());
    at::Tensor grad_gates = torch::zeros({n * k}, gates.options());
    const int64_t experts = expert_in.size(0);
    const at::Tensor gates_flat = gates.reshape({-1});
    for (int64_t e = 0; e < experts; ++e) {
      const int64_t begin = offsets[e], count = offsets[e + 1] - begin;
      if (count == 0) continue;
      const at::Tensor pairs = order.narrow(0, begin, count);
      const at::Tensor rows = pairs.div(k, "floor");
      const at::Tensor hidden = hidden_sorted.narrow(0, begin, count);
      // d/d(tanh output) of g . (gate * tanh(.) B_e), without the gate: (g B_e^T).
      const at::Tensor d_hidden = grad_out.index_select(0, rows).mm(expert_out[e].t());
      grad_gates.index_copy_(0, pairs, (d_hidden * hidden).sum(1));
      if (h_needs_grad) {
        const at::Tensor gate = gates_flat.index_select(0, pairs).unsqueeze(1);
        const at::Tensor d_pre = gate * d_hidden * (1 - hidden * hidden);  // tanh' = 1 - tanh^2
        grad_h.index_add_(0, rows, d_pre.mm(expert_in[e].t()));
      }
    }
    return {grad_h, grad_gates.view_as(gates), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

}  // namespace

at::Tensor applyExperts(const at::Tensor& h, const at::Tensor& topk, const at::Tensor& gates,
                        const LayerWeights& w) {
  return ExpertFfn::apply(h, gates, topk, w.expert_in, w.expert_out, /*residual=*/true);
}

at::Tensor expertOutput(const at::Tensor& h, const at::Tensor& topk, const at::Tensor& gates,
                        const LayerWeights& w) {
  return ExpertFfn::apply(h, gates, topk, w.expert_in, w.expert_out, /*residual=*/false);
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
