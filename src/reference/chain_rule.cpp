#include "reference/chain_rule.hpp"

#include <cblas.h>

#include <algorithm>
#include <cmath>

#include "reference/layer_cache.hpp"
#include "reference/parallel.hpp"

namespace moe::reference {

std::vector<double> chainRule(const double* hidden, const double* grad_logits, Index T, int H, int E) {
  std::vector<double> grad(std::size_t(H) * E, 0.0);
  const SingleThreadedBlas small(double(T) * H * E < kSmallBlasWork);
  cblas_dgemm(CblasRowMajor, CblasTrans, CblasNoTrans, H, E, int(T), 1.0, hidden, H, grad_logits, E, 0.0, grad.data(),
              E);
  return grad;
}

double chainRuleErrorBound(double max_hidden_column_norm, const double* err, Index T, int E) {
  if (err == nullptr) return 0.0;
  std::vector<double> e_norm(E, 0.0);
  for (Index t = 0; t < T; ++t) {
    const double* et = &err[std::size_t(t) * E];
    for (int e = 0; e < E; ++e) e_norm[e] += et[e] * et[e];
  }
  return max_hidden_column_norm * std::sqrt(*std::max_element(e_norm.begin(), e_norm.end()));
}

double hiddenPass(const double* h, Index T, int H, const std::vector<const double*>& us,
                  const std::vector<double*>& dots) {
  const int workers = workerCount();
  std::vector<std::vector<double>> column_sq(workers);
  const std::size_t n_dirs = us.size();
  parallelFor(T, workers, [&](Index begin, Index end, int worker) {
    std::vector<double> sq(H, 0.0);
    for (Index t = begin; t < end; ++t) {
      const double* ht = h + t * H;
      for (int i = 0; i < H; ++i) sq[i] += ht[i] * ht[i];
      for (std::size_t d = 0; d < n_dirs; ++d) dots[d][t] = dotInterleaved(ht, us[d], H);
    }
    column_sq[worker] = std::move(sq);
  });
  std::vector<double> total(H, 0.0);
  for (const auto& sq : column_sq)
    for (int i = 0; i < int(sq.size()); ++i) total[i] += sq[i];
  return std::sqrt(*std::max_element(total.begin(), total.end()));
}

}  // namespace moe::reference
