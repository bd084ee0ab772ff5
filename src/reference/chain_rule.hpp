// The exact chain rule from logit derivatives to router-weight derivatives: W_l enters the objective
// only through z_l = h_l W_l and h_l does not depend on W_l, so dJ/dW_l = h_l^T dJ/dz_l. Internal to
// src/reference.
#pragma once

#include <cstdint>
#include <vector>

namespace moe::reference {

// dW = h^T G [H, E] (dgemm), the second product per layer.
std::vector<double> chainRule(const double* hidden, const double* grad_logits, std::int64_t T, int H, int E);

// Error bound carried through dW = h^T G: |sum_t h_ti err_te| <= ||h_{:,i}||_2 ||err_{:,e}||_2.
double chainRuleErrorBound(double max_hidden_column_norm, const double* err, std::int64_t T, int E);

// One pass over a layer input h [T, H]: returns max_i ||h[:, i]||_2 and fills dots[d][t] = h_t . us[d].
double hiddenPass(const double* h, std::int64_t T, int H, const std::vector<const double*>& us,
                  const std::vector<double*>& dots);

}  // namespace moe::reference
