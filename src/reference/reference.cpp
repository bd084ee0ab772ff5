// The single-device float64 reference of DESIGN §4. Torch-free and independent of src/model and
// src/sim: it shares only the scenario structs and the problem data with the simulation it judges.
//
// Method (DESIGN §4):
//  * One forward pass over the whole global batch caches, per layer, the logits z_l = h_l W_l (dgemm),
//    their exponentials and row sums, the routing, the gate weights and the expert activations.
//  * W_l enters J only through z_l and h_l does not depend on W_l, so dJ/dW_l = h_l^T dJ/dz_l exactly
//    (second dgemm). dJ/dz_l[t,e] is obtained by central finite differences of token t's own
//    contribution phi_t (the model has no attention, so a logit of token t changes only token t's path;
//    with the counts c_e and the routing held fixed J is a sum of such per-token terms).
//  * phi_t(z + d e_j) - phi_t(z) is evaluated *as a difference* in closed form: expm1/log1p for the
//    softmax sums and the logsumexp, sigma(x+d) - sigma(x) = -sigma(x+d) sigma(-x) expm1(-d),
//    tanh(x+d) - tanh(x) = tanh(d) sech^2(x) / (1 + tanh(x) tanh(d)), ratio changes (N+dN)/(S+dS) - N/S =
//    (dN - (N/S) dS) / (S + dS). Never as the difference of two large values, so the differences keep
//    full relative precision and the only FD error left is truncation (then removed by Richardson).
//    For the single-layer aux/z terms one perturbation costs O(1) (expm1 of the step is tabled).
//  * Token t's later layers and main loss (its "suffix") depend on z_l[t] only through its k gate
//    weights at layer l. Their sensitivities psi_s = d suffix / d g_s are central differences of the
//    suffix recomputed for that one token (routing frozen, later flips detected), k of them per token;
//    each logit's derivative is then its own layer-l term plus sum_s psi_s dg_s/dz, dg_s/dz again by
//    central differences of the closed-form gate change. Exact chain rule at the gates, and E/k times
//    cheaper than recomputing the suffix for every logit.
//  * Richardson: D(h) and D(h/2) give R = (4 D(h/2) - D(h)) / 3, the number reported. Its error is
//    estimated from one more level, D(h/4): |R(h) - R(h/2)| * 16/15 (the O(h^4) term of R). The plain
//    |D(h/2) - D(h)| / 3 estimates the error of D(h/2), not of R, and would overstate the error of the
//    reported number by about (h^2 f''' / 24) / (h^4 f^(5) / 480), i.e. 1e4-1e5 at h = 1e-3.
//  * Steps respect the top-k margins (scores are monotone in the logits for softmax and sigmoid); below
//    options.min_step the routing is frozen at the unperturbed choice and the element counted.
#include "reference/reference.hpp"

#include <cblas.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <limits>
#include <string>
#include <thread>

#include "common/errors.hpp"
#include "data/splitmix64.hpp"
#include "scenario/catalog.hpp"

namespace moe {

ObjectiveDefinition intendedObjective(const Scenario& scenario) {
  ObjectiveDefinition objective;
  objective.score = scenario.model.score;
  objective.top_k = scenario.model.top_k;
  objective.norm_topk_prob = scenario.model.norm_topk_prob;
  objective.aux_scope = scenario.aux.type;
  objective.aux_coeff = scenario.aux.coeff;
  objective.z_coeff = scenario.aux.z_loss_coeff;
  objective.z_scope = scenario.aux.z_loss_scope;
  objective.exclude_padding = scenario.aux.exclude_padding;
  objective.dp = scenario.mesh.dp;
  objective.microbatches = scenario.mesh.microbatches;
  const PresetInfo* preset = findPreset(scenario.framework.preset);
  if (preset == nullptr) {
    throw InputError(scenario.source_file, "/framework/preset",
                     "a known preset (see `moe-lbcheck list presets`), got '" +
                         scenario.framework.preset + "'");
  }
  objective.main_scope = preset->main_loss_scope;
  objective.group_weighting = scenario.aux.group_weighting == GroupWeighting::kPreset
                                  ? preset->aux_group_weighting
                                  : scenario.aux.group_weighting;
  return objective;
}

namespace {

using Index = std::int64_t;
constexpr double kInf = std::numeric_limits<double>::infinity();

// sigma(x + d) - sigma(x) without cancellation and without a new exponential, from s = sigma(x),
// sn = sigma(-x) and expm1(-d): sigma(a) - sigma(b) = -sigma(a) sigma(-b) expm1(b - a), and
// sigma(x + d) = s / (s + sn e^{-d}).
inline double sigmoidDelta(double s, double sn, double expm1_of_minus_d) {
  const double shifted = s / (s + sn * (1.0 + expm1_of_minus_d));
  return -shifted * sn * expm1_of_minus_d;
}

inline double dot(const double* a, const double* b, int n) {
  double s = 0.0;
  for (int i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}

// Top-k order of DESIGN §3: higher score first, ties -> lower expert index. Scores are monotone in the
// logits (softmax and sigmoid), so the logits are compared: the same order, without the rounding of
// the scores.
inline bool ranksBefore(const double* logits, int a, int b) {
  return logits[a] > logits[b] || (logits[a] == logits[b] && a < b);
}


// Runs fn(begin, end, worker) over [0, count) on a few threads. Every element is written by exactly one
// worker and nothing is reduced across workers here, so the results do not depend on the thread count.
template <typename Fn>
void parallelFor(Index count, int workers, Fn fn) {
  workers = static_cast<int>(std::max<Index>(1, std::min<Index>(workers, count)));
  if (workers == 1) {
    fn(Index{0}, count, 0);
    return;
  }
  std::vector<std::thread> threads;
  const Index chunk = (count + workers - 1) / workers;
  for (int w = 0; w < workers; ++w) {
    const Index begin = w * chunk, end = std::min(count, begin + chunk);
    if (begin >= end) break;
    threads.emplace_back([=, &fn] { fn(begin, end, w); });
  }
  for (auto& th : threads) th.join();
}

int workerCount() {
  const unsigned hw = std::thread::hardware_concurrency();
  return static_cast<int>(std::clamp(hw == 0 ? 1u : hw, 1u, 16u));
}

// Token sets and per-token weights of DESIGN §3.
struct TokenGroups {
  std::vector<int> aux_group;     // [T] aux group of token t; -1 when t is outside the aux token set
  std::vector<Index> aux_size;    // [groups] T_G
  int aux_groups = 0;             // all groups, empty ones included
  int aux_nonempty = 0;           // groups with T_G > 0 (the mean of J_aux runs over these)
  Index empty_groups = 0;
  std::vector<double> aux_group_weight;  // [groups] omega_G: 1/n_nonempty, or T_G / sum_G T_G
  std::vector<double> z_weight;    // [T] weight of lse_t^2 in J_z, beta included
  std::vector<double> main_weight; // [T] weight of 0.5 ||h_L - y||^2 in J_main
};

TokenGroups buildGroups(const ProblemData& data, const ObjectiveDefinition& objective) {
  const int B = data.batch, S = data.seq_len;
  const Index T = data.tokens();
  TokenGroups groups;
  const int chunks = objective.dp * objective.microbatches;
  const bool needs_chunks = objective.aux_scope == AuxScope::kMicroBatch ||
                            objective.z_scope == ZLossScope::kMicroBatch ||
                            objective.main_scope == MainLossScope::kMicrobatchMean;
  if (needs_chunks && (chunks <= 0 || B % chunks != 0)) {
    throw InputError("", "/mesh",
                     "a batch divisible by dp*microbatches for the micro_batch token groups (batch " +
                         std::to_string(B) + ", dp*microbatches " + std::to_string(chunks) + ")");
  }
  const int sequences_per_chunk = chunks > 0 && B % chunks == 0 ? B / chunks : B;
  // micro_batch groups: dp*M consecutive chunks of B/(dp*M) sequences (DESIGN §3 "Global batch B is
  // split"); sequence groups: one per sequence (DeepSeek-V3 eq. 17-20); global_batch: one group.
  auto chunkOf = [&](Index t) { return static_cast<int>((t / S) / sequences_per_chunk); };
  auto inAuxSet = [&](Index t) { return !objective.exclude_padding || data.valid[t] != 0; };
  const int n_chunks = B / sequences_per_chunk;

  switch (objective.aux_scope) {
    case AuxScope::kMicroBatch: groups.aux_groups = n_chunks; break;
    case AuxScope::kSequence: groups.aux_groups = B; break;
    case AuxScope::kGlobalBatch: groups.aux_groups = 1; break;
  }
  groups.aux_group.assign(T, -1);
  groups.aux_size.assign(groups.aux_groups, 0);
  for (Index t = 0; t < T; ++t) {
    if (!inAuxSet(t)) continue;
    int g = 0;
    if (objective.aux_scope == AuxScope::kMicroBatch) g = chunkOf(t);
    if (objective.aux_scope == AuxScope::kSequence) g = static_cast<int>(t / S);
    groups.aux_group[t] = g;
    ++groups.aux_size[g];
  }
  Index aux_tokens = 0;
  for (Index size : groups.aux_size) {
    if (size > 0) ++groups.aux_nonempty;
    else ++groups.empty_groups;
    aux_tokens += size;
  }
  // Group weights: uniform (DESIGN §3: alpha * mean over groups) or token-weighted (Megatron
  // per-token mode, torchtitan: raw_sum * coeff / global_valid_tokens).
  groups.aux_group_weight.assign(groups.aux_groups, 0.0);
  for (int g = 0; g < groups.aux_groups; ++g) {
    if (groups.aux_size[g] == 0) continue;
    groups.aux_group_weight[g] = objective.group_weighting == GroupWeighting::kTokens
                                     ? double(groups.aux_size[g]) / double(aux_tokens)
                                     : 1.0 / groups.aux_nonempty;
  }

  // z-loss (DESIGN §3): micro_batch: beta * mean over chunks (with aux tokens) of the chunk's mean of
  // lse^2 (Megatron z_loss_func per microbatch); global_batch: beta * mean over all aux tokens.
  groups.z_weight.assign(T, 0.0);
  {
    std::vector<Index> chunk_tokens(n_chunks, 0);
    Index all_tokens = 0;
    for (Index t = 0; t < T; ++t) {
      if (!inAuxSet(t)) continue;
      ++chunk_tokens[chunkOf(t)];
      ++all_tokens;
    }
    int nonempty_chunks = 0;
    for (Index n : chunk_tokens) nonempty_chunks += n > 0 ? 1 : 0;
    for (Index t = 0; t < T; ++t) {
      if (!inAuxSet(t)) continue;
      // Token-weighted chunk means collapse to one mean over all aux tokens.
      const bool per_chunk = objective.z_scope == ZLossScope::kMicroBatch &&
                             objective.group_weighting == GroupWeighting::kUniform;
      groups.z_weight[t] = per_chunk
                               ? objective.z_coeff / (double(chunk_tokens[chunkOf(t)]) * nonempty_chunks)
                               : objective.z_coeff / double(all_tokens);
    }
  }

  // Main loss (DESIGN §3, scope per preset): valid tokens only. token_mean: 1/|V|; microbatch_mean:
  // mean over chunks with >= 1 valid token of the chunk's valid-token mean.
  groups.main_weight.assign(T, 0.0);
  {
    std::vector<Index> chunk_valid(n_chunks, 0);
    Index all_valid = 0;
    for (Index t = 0; t < T; ++t) {
      if (!data.valid[t]) continue;
      ++chunk_valid[chunkOf(t)];
      ++all_valid;
    }
    int nonempty_chunks = 0;
    for (Index n : chunk_valid) nonempty_chunks += n > 0 ? 1 : 0;
    for (Index t = 0; t < T; ++t) {
      if (!data.valid[t]) continue;
      groups.main_weight[t] = objective.main_scope == MainLossScope::kMicrobatchMean
                                  ? 1.0 / (double(chunk_valid[chunkOf(t)]) * nonempty_chunks)
                                  : 1.0 / double(all_valid);
    }
  }
  return groups;
}

void checkProblem(const ProblemData& data, const ObjectiveDefinition& objective) {
  auto fail = [](const std::string& what) { throw InputError("", "/data", what); };
  if (data.batch <= 0 || data.seq_len <= 0 || data.hidden <= 0 || data.experts <= 0 || data.layers <= 0)
    fail("positive batch, seq_len, hidden, experts and layers");
  const Index T = data.tokens();
  const std::size_t H = data.hidden, E = data.experts, L = data.layers;
  if (objective.top_k < 1 || objective.top_k > data.experts)
    throw InputError("", "/model/top_k", "1 <= top_k <= experts");
  if (data.x.size() != T * H || data.y.size() != T * H || data.valid.size() != std::size_t(T))
    fail("x and y of B*S*H values and valid of B*S values");
  if (data.router_weight.size() != L || data.expert_in.size() != L || data.expert_out.size() != L)
    fail("router and expert weights for every layer");
  for (std::size_t l = 0; l < L; ++l) {
    if (data.router_weight[l].size() != H * E) fail("router weight [H, E] of layer " + std::to_string(l));
  }
}

// A rank-one direction of the directional checks for one layer: V_l = scale * u v^T.
struct RankOneDirection {
  std::vector<double> u;  // [H]
  std::vector<double> v;  // [E]
  double scale = 0.0;
  std::vector<double> hidden_dot_u;  // [T] h_l[t] . u at the unperturbed point
};

struct LayerCache {
  std::vector<double> hidden;     // [T, H] input of the layer (empty for layer 0: data.x is used)
  std::vector<double> logits;     // [T, E] z = h W
  std::vector<double> exp_shift;  // [T, E] exp(z - max_e z)
  std::vector<double> exp_sum;    // [T] sum_e exp(z - max)
  std::vector<double> lse;        // [T] logsumexp_e z
  std::vector<double> sig;        // [T, E] sigmoid(z)  (sigmoid score)
  std::vector<double> sig_neg;    // [T, E] sigmoid(-z) (sigmoid score)
  std::vector<double> sig_sum;    // [T] sum_e sigmoid(z)
  std::vector<int> topk;          // [T, k] routed experts, best first
  std::vector<double> gate;       // [T, k] gate weights g
  std::vector<double> topk_sum;   // [T] sum of the top-k scores (exp_shift or sig): norm_topk_prob
  std::vector<double> aux_weight; // [groups, E] alpha*omega_G*E*c_{G,e} / (k*T_G^2), omega_G the group weight
  std::vector<double> aux_mean;   // [T] a_t = sum_e w_e p_{t,e} (token t's aux contribution)
  bool has_experts = false;
  std::vector<double> act;        // [T, k, F] tanh(h A_e) of the routed experts
  std::vector<double> sech2;      // [T, k, F] 1 - tanh^2(h A_e) = 1 / cosh^2(h A_e)
  std::vector<double> out;        // [T, k, H] Expert_e(h) = tanh(h A_e) B_e
  double aux_value = 0.0, z_value = 0.0;
};

struct Scratch {
  std::vector<double> dh, dh_next, dz, em, ds, dg, dpre, du;
  std::vector<char> marked;
  // Suffix sensitivities of the current token to its k gate weights (see suffixGateGradient).
  std::vector<double> psi_aux, psi_main, psi_aux_err, psi_main_err, dg_up, dg_down;
  std::vector<char> psi_flipped;
  Scratch(int H, int E, int k, int F)
      : dh(H), dh_next(H), dz(E), em(E), ds(E), dg(k), dpre(std::max(F, 1)), du(std::max(F, 1)),
        marked(E, 0), psi_aux(k), psi_main(k), psi_aux_err(k), psi_main_err(k), dg_up(k),
        dg_down(k), psi_flipped(k) {}
};

struct Delta {
  double aux = 0.0;   // change of token t's J_aux + J_z contribution
  double main = 0.0;  // change of token t's J_main contribution
  bool routing_changed = false;
};

class ReferenceModel {
 public:
  ReferenceModel(const ProblemData& data, const ObjectiveDefinition& objective, bool with_main,
                 bool last_layer_experts)
      : data_(data), obj_(objective), with_main_(with_main), last_layer_experts_(last_layer_experts) {
    checkProblem(data, objective);
    T_ = data.tokens();
    H_ = data.hidden;
    E_ = data.experts;
    F_ = data.ffn;
    L_ = data.layers;
    k_ = objective.top_k;
    softmax_ = objective.score == ScoreFunction::kSoftmax;
    groups_ = buildGroups(data, objective);
    has_aux_terms_ = objective.aux_coeff != 0.0 || objective.z_coeff != 0.0;
  }

  const TokenGroups& groups() const { return groups_; }
  const LayerCache& layer(int l) const { return layers_[l]; }
  const double* hidden(int l) const { return l == 0 ? data_.x.data() : layers_[l].hidden.data(); }
  double mainValue() const { return main_value_; }

  // One full forward pass with routing recomputed (DESIGN §3).
  void forward() {
    layers_.assign(L_, LayerCache{});
    for (int l = 0; l < L_; ++l) {
      const bool experts = l < L_ - 1 || last_layer_experts_;
      if (experts && (data_.expert_in[l].size() != std::size_t(E_) * H_ * F_ ||
                      data_.expert_out[l].size() != std::size_t(E_) * F_ * H_)) {
        throw InputError("", "/data", "expert weights [E, H, F] and [E, F, H] of layer " + std::to_string(l));
      }
      forwardLayer(l, experts);
    }
    if (with_main_) {
      // Main loss (DESIGN §3): sum over valid tokens of weight_t * 0.5 ||h_L - y||^2.
      residual_.assign(std::size_t(T_) * H_, 0.0);
      main_value_ = 0.0;
      for (Index t = 0; t < T_; ++t) {
        double sq = 0.0;
        for (int i = 0; i < H_; ++i) {
          const double r = final_hidden_[t * H_ + i] - data_.y[t * H_ + i];
          residual_[t * H_ + i] = r;
          sq += r * r;
        }
        main_value_ += groups_.main_weight[t] * 0.5 * sq;
      }
    }
  }

  // d(J_aux + J_z)/dz_l and dJ_main/dz_l by per-token central differences (DESIGN §4). Rows of
  // tokens that do not contribute stay zero.
  void logitGradients(int l, const ReferenceOptions& options, std::vector<double>& grad_aux,
                      std::vector<double>& err_aux, std::vector<double>& grad_main,
                      std::vector<double>& err_main, std::int64_t& near_ties,
                      std::int64_t& frozen, double& max_step) const {
    const std::size_t TE = std::size_t(T_) * E_;
    grad_aux.assign(TE, 0.0);
    err_aux.assign(TE, 0.0);
    grad_main.assign(with_main_ ? TE : 0, 0.0);
    err_main.assign(with_main_ ? TE : 0, 0.0);
    const int workers = workerCount();
    struct Counters {
      std::int64_t ties = 0, frozen = 0;
      double max_step = 0.0;
      char pad[64];  // no false sharing between workers
    };
    std::vector<Counters> counters(workers);
    // expm1(+-step/2^level), shared by every element whose step was not shrunk.
    double table_plus[3], table_minus[3];
    for (int lev = 0; lev < 3; ++lev) {
      table_plus[lev] = std::expm1(options.step / double(1 << lev));
      table_minus[lev] = std::expm1(-options.step / double(1 << lev));
    }
    parallelFor(T_, workers, [&](Index begin, Index end, int worker) {
      Scratch scratch(H_, E_, k_, F_);
      std::vector<char> in_topk(E_, 0);
      Counters local;
      for (Index t = begin; t < end; ++t) {
        // aux_token: contributes aux/z terms at this layer and the later ones; main_token: to J_main.
        // The suffix (gates -> later layers -> h_L) matters when a later term depends on this token.
        const bool aux_token = groups_.aux_group[t] >= 0 && has_aux_terms_;
        const bool main_token = with_main_ && groups_.main_weight[t] != 0.0;
        const bool suffix = (l < L_ - 1 && aux_token) || main_token;
        if (!aux_token && !suffix) continue;
        const TokenRow row = tokenRow(l, t);
        const double* z = row.z;
        const int* topk = row.topk;
        // Gate step step/4: the largest gate change a logit step produces (dg/dz = g(1-g) <= 1/4).
        if (suffix) suffixGateGradient(l, t, options.step / 4.0, scratch);
        // Top-k margins (DESIGN §4): z_e minus the best non-top-k logit for routed experts, the
        // weakest routed logit minus z_e for the others; equal logits are a margin of 0.
        for (int s = 0; s < k_; ++s) in_topk[topk[s]] = 1;
        const double weakest_routed = z[topk[k_ - 1]];
        double best_unrouted = -kInf;
        for (int e = 0; e < E_; ++e)
          if (!in_topk[e]) best_unrouted = std::max(best_unrouted, z[e]);
        for (int j = 0; j < E_; ++j) {
          const double margin = in_topk[j] ? z[j] - best_unrouted : weakest_routed - z[j];
          double h = std::min(options.step, margin / 4.0);
          const bool shrunk = h < options.step;
          const bool frozen_by_margin = h < options.min_step;
          if (frozen_by_margin) h = options.step;  // routing frozen: the gradient of the current piece
          if (shrunk) ++local.ties;
          local.max_step = std::max(local.max_step, h);
          const bool tabled = h == options.step;
          // D(d) = [phi_local(+d) - phi_local(-d)] / 2d + sum_s psi_s [g_s(+d) - g_s(-d)] / 2d: the
          // suffix enters through the k gate weights only (chain rule at the gates, module comment).
          double D_aux[3], D_main[3];
          bool gates_move = false, routing_changed = false;
          double suffix_err_aux = 0.0, suffix_err_main = 0.0;
          for (int lev = 0; lev < 3; ++lev) {
            const double d = h / double(1 << lev);
            const double em_plus = tabled ? table_plus[lev] : std::expm1(d);
            const double em_minus = tabled ? table_minus[lev] : std::expm1(-d);
            D_aux[lev] = aux_token ? (localDelta(row, j, em_plus, em_minus) -
                                      localDelta(row, j, em_minus, em_plus)) / (2.0 * d)
                                   : 0.0;
            D_main[lev] = 0.0;
            if (!suffix) continue;
            double* dg_up = scratch.dg_up.data();
            double* dg_down = scratch.dg_down.data();
            gates_move = gateDelta(row, j, em_plus, em_minus, in_topk, dg_up);
            if (!gates_move) continue;
            gateDelta(row, j, em_minus, em_plus, in_topk, dg_down);
            for (int s = 0; s < k_; ++s) {
              const double gate_slope = (dg_up[s] - dg_down[s]) / (2.0 * d);
              D_aux[lev] += scratch.psi_aux[s] * gate_slope;
              D_main[lev] += scratch.psi_main[s] * gate_slope;
              if (lev > 0) continue;
              suffix_err_aux += std::abs(gate_slope) * scratch.psi_aux_err[s];
              suffix_err_main += std::abs(gate_slope) * scratch.psi_main_err[s];
              if (gate_slope != 0.0 && scratch.psi_flipped[s]) routing_changed = true;
            }
          }
          if (frozen_by_margin || routing_changed) ++local.frozen;
          // Richardson: R(h) = (4 D(h/2) - D(h)) / 3; error of R(h) ~ 16/15 |R(h) - R(h/2)|, plus the
          // error of the suffix sensitivities carried through the gate slopes.
          const std::size_t at = std::size_t(t) * E_ + j;
          const double r1 = (4.0 * D_aux[1] - D_aux[0]) / 3.0, r2 = (4.0 * D_aux[2] - D_aux[1]) / 3.0;
          grad_aux[at] = r1;
          err_aux[at] = std::abs(r1 - r2) * 16.0 / 15.0 + suffix_err_aux;
          if (with_main_) {
            const double m1 = (4.0 * D_main[1] - D_main[0]) / 3.0, m2 = (4.0 * D_main[2] - D_main[1]) / 3.0;
            grad_main[at] = m1;
            err_main[at] = std::abs(m1 - m2) * 16.0 / 15.0 + suffix_err_main;
          }
        }
        for (int s = 0; s < k_; ++s) in_topk[topk[s]] = 0;
      }
      counters[worker] = local;
    });
    for (const Counters& w : counters) {
      near_ties += w.ties;
      frozen += w.frozen;
      max_step = std::max(max_step, w.max_step);
    }
  }

  // Central differences of J_aux + J_z along a rank-one direction per layer, summed over every token
  // (all tokens and layers recomputed, routing and counts frozen), Richardson-extrapolated.
  void directional(const std::vector<RankOneDirection>& dir, double eps, double& derivative,
                   double& error) const {
    const int workers = workerCount();
    // per_token[lev][t]: token t's contribution change at +eps/2^lev minus the one at -eps/2^lev.
    std::vector<std::vector<double>> per_token(3, std::vector<double>(T_, 0.0));
    const RankOneDirection& first = dir[0];
    parallelFor(T_, workers, [&](Index begin, Index end, int) {
      Scratch scratch(H_, E_, k_, F_);
      // Layer 0 logits move linearly in the step: dz = step * scale * (x_t . u) v. expm1 at the smallest
      // step, then expm1(2y) = expm1(y) (expm1(y) + 2) for the larger ones (no new exponential).
      std::vector<double> em_up[3], em_down[3];
      for (int lev = 0; lev < 3; ++lev) em_up[lev].resize(E_), em_down[lev].resize(E_);
      for (Index t = begin; t < end; ++t) {
        if (groups_.aux_group[t] < 0 || !has_aux_terms_) continue;
        const double slope = eps / 4.0 * first.scale * first.hidden_dot_u[t];
        for (int e = 0; e < E_; ++e) {
          em_up[2][e] = std::expm1(slope * first.v[e]);
          em_down[2][e] = std::expm1(-slope * first.v[e]);
        }
        for (int lev = 1; lev >= 0; --lev)
          for (int e = 0; e < E_; ++e) {
            em_up[lev][e] = em_up[lev + 1][e] * (em_up[lev + 1][e] + 2.0);
            em_down[lev][e] = em_down[lev + 1][e] * (em_down[lev + 1][e] + 2.0);
          }
        for (int lev = 0; lev < 3; ++lev) {
          const double d = eps / double(1 << lev);
          const double up = propagate(0, t, /*dh_zero=*/true, &dir, d, /*include_main=*/false, scratch,
                                      em_up[lev].data()).aux;
          const double down = propagate(0, t, true, &dir, -d, false, scratch, em_down[lev].data()).aux;
          per_token[lev][t] = up - down;
        }
      }
    });
    double D[3];
    for (int lev = 0; lev < 3; ++lev) {
      double sum = 0.0;
      for (Index t = 0; t < T_; ++t) sum += per_token[lev][t];
      D[lev] = sum / (2.0 * eps / double(1 << lev));
    }
    const double r1 = (4.0 * D[1] - D[0]) / 3.0, r2 = (4.0 * D[2] - D[1]) / 3.0;
    derivative = r1;
    error = std::abs(r1 - r2) * 16.0 / 15.0;
  }

 private:
  void forwardLayer(int l, bool experts) {
    LayerCache& c = layers_[l];
    const double* h = hidden(l);
    const std::size_t TE = std::size_t(T_) * E_;
    const double* W = data_.router_weight[l].data();
    // z = h W  [T, E] (DESIGN §3 "logits z = h W_l"), first of the two products per layer.
    c.logits.assign(TE, 0.0);
    cblas_dgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, int(T_), E_, H_, 1.0, h, H_, W, E_, 0.0,
                c.logits.data(), E_);
    c.exp_shift.assign(TE, 0.0);
    c.exp_sum.assign(T_, 0.0);
    c.lse.assign(T_, 0.0);
    if (!softmax_) {
      c.sig.assign(TE, 0.0);
      c.sig_neg.assign(TE, 0.0);
      c.sig_sum.assign(T_, 0.0);
    }
    c.topk.assign(std::size_t(T_) * k_, 0);
    c.gate.assign(std::size_t(T_) * k_, 0.0);
    c.topk_sum.assign(T_, 0.0);
    parallelFor(T_, workerCount(), [&](Index begin, Index end, int) {
      std::vector<int> order(E_);
      for (Index t = begin; t < end; ++t) {
        const double* z = &c.logits[t * E_];
        double* ex = &c.exp_shift[t * E_];
        const double m = *std::max_element(z, z + E_);
        double sum = 0.0;
        for (int e = 0; e < E_; ++e) sum += (ex[e] = std::exp(z[e] - m));
        c.exp_sum[t] = sum;
        c.lse[t] = m + std::log(sum);
        double sig_sum = 0.0;
        if (!softmax_) {
          for (int e = 0; e < E_; ++e) {
            // sigma(z) and sigma(-z) from one exponential of -|z| (no overflow, no cancellation).
            const double small = std::exp(-std::abs(z[e]));
            const double big_part = 1.0 / (1.0 + small), small_part = small / (1.0 + small);
            c.sig[t * E_ + e] = z[e] >= 0.0 ? big_part : small_part;
            c.sig_neg[t * E_ + e] = z[e] >= 0.0 ? small_part : big_part;
            sig_sum += c.sig[t * E_ + e];
          }
          c.sig_sum[t] = sig_sum;
        }
        // Routing: top-k of the scores, ties -> lower index (DESIGN §3).
        for (int e = 0; e < E_; ++e) order[e] = e;
        std::partial_sort(order.begin(), order.begin() + k_, order.end(),
                          [&](int a, int b) { return ranksBefore(z, a, b); });
        const double* score = softmax_ ? ex : &c.sig[t * E_];
        double topk_sum = 0.0;
        for (int s = 0; s < k_; ++s) {
          c.topk[t * k_ + s] = order[s];
          topk_sum += score[order[s]];
        }
        c.topk_sum[t] = topk_sum;
        // Gate weights: the top-k scores (softmax p = exp/sum, sigmoid s), divided by their sum when
        // norm_topk_prob (DeepSeek-V3 eq. 13-15; DESIGN §3).
        const double denominator = obj_.norm_topk_prob ? topk_sum : (softmax_ ? sum : 1.0);
        for (int s = 0; s < k_; ++s) c.gate[t * k_ + s] = score[order[s]] / denominator;
      }
    });

    // Counts and aux weights (DESIGN §3; Megatron switch_load_balancing_loss_func, DeepSeek-V3 eq.
    // 17-20): c_{G,e} = #{t in G : e in topk(t)} (no gradient), P_{G,e} = (1/T_G) sum_t p_{t,e},
    // L_bal(G) = E/(k T_G) sum_e c_e P_e, J_aux = alpha * sum_G omega_G L_bal(G) (omega: group weights).
    // Token t of group G contributes sum_e w_{G,e} p_{t,e} with w_{G,e} = alpha omega_G E c_e/(k T_G^2).
    const int G = groups_.aux_groups;
    std::vector<double> counts(std::size_t(G) * E_, 0.0), prob_sums(std::size_t(G) * E_, 0.0);
    for (Index t = 0; t < T_; ++t) {
      const int g = groups_.aux_group[t];
      if (g < 0) continue;
      for (int s = 0; s < k_; ++s) counts[std::size_t(g) * E_ + c.topk[t * k_ + s]] += 1.0;
      const double* p = softmax_ ? &c.exp_shift[t * E_] : &c.sig[t * E_];
      const double norm = softmax_ ? c.exp_sum[t] : c.sig_sum[t];
      for (int e = 0; e < E_; ++e) prob_sums[std::size_t(g) * E_ + e] += p[e] / norm;
    }
    c.aux_weight.assign(std::size_t(G) * E_, 0.0);
    c.aux_value = 0.0;
    const double alpha = obj_.aux_coeff;
    for (int g = 0; g < G; ++g) {
      const double Tg = double(groups_.aux_size[g]);
      if (groups_.aux_size[g] == 0) continue;
      const double omega = groups_.aux_group_weight[g];
      double balance = 0.0;  // sum_e c_e P_e
      for (int e = 0; e < E_; ++e) {
        balance += counts[std::size_t(g) * E_ + e] * (prob_sums[std::size_t(g) * E_ + e] / Tg);
        c.aux_weight[std::size_t(g) * E_ + e] =
            alpha * omega * E_ * counts[std::size_t(g) * E_ + e] / (k_ * Tg * Tg);
      }
      c.aux_value += alpha * omega * (double(E_) / (k_ * Tg)) * balance;
    }
    c.aux_mean.assign(T_, 0.0);
    c.z_value = 0.0;
    for (Index t = 0; t < T_; ++t) {
      const int g = groups_.aux_group[t];
      if (g < 0) continue;
      const double* w = &c.aux_weight[std::size_t(g) * E_];
      const double* p = softmax_ ? &c.exp_shift[t * E_] : &c.sig[t * E_];
      const double norm = softmax_ ? c.exp_sum[t] : c.sig_sum[t];
      c.aux_mean[t] = dot(w, p, E_) / norm;
      // z-loss (ST-MoE eq. 5, Megatron z_loss_func): weight_t * (logsumexp_e z_{t,e})^2.
      c.z_value += groups_.z_weight[t] * c.lse[t] * c.lse[t];
    }

    // Experts (DESIGN §3): h_{l+1} = h_l + sum_{e in topk} g_e tanh(h_l A_e) B_e.
    c.has_experts = experts;
    if (!experts) return;
    c.act.assign(std::size_t(T_) * k_ * F_, 0.0);
    c.sech2.assign(std::size_t(T_) * k_ * F_, 0.0);
    c.out.assign(std::size_t(T_) * k_ * H_, 0.0);
    std::vector<double>& next = l + 1 < L_ ? layers_[l + 1].hidden : final_hidden_;
    next.assign(h, h + std::size_t(T_) * H_);
    parallelFor(T_, workerCount(), [&](Index begin, Index end, int) {
      std::vector<double> pre(std::max(F_, 1));
      for (Index t = begin; t < end; ++t) {
        const double* ht = h + t * H_;
        for (int s = 0; s < k_; ++s) {
          const int e = c.topk[t * k_ + s];
          const double* A = &data_.expert_in[l][std::size_t(e) * H_ * F_];
          const double* Bm = &data_.expert_out[l][std::size_t(e) * F_ * H_];
          double* act = &c.act[(std::size_t(t) * k_ + s) * F_];
          double* sech2 = &c.sech2[(std::size_t(t) * k_ + s) * F_];
          double* out = &c.out[(std::size_t(t) * k_ + s) * H_];
          std::fill(pre.begin(), pre.end(), 0.0);
          for (int i = 0; i < H_; ++i) {
            const double hi = ht[i];
            const double* row = A + std::size_t(i) * F_;
            for (int f = 0; f < F_; ++f) pre[f] += hi * row[f];
          }
          for (int f = 0; f < F_; ++f) {
            act[f] = std::tanh(pre[f]);
            const double ch = std::cosh(pre[f]);
            sech2[f] = 1.0 / (ch * ch);
          }
          for (int f = 0; f < F_; ++f) {
            const double a = act[f];
            const double* row = Bm + std::size_t(f) * H_;
            for (int i = 0; i < H_; ++i) out[i] += a * row[i];
          }
          const double g = c.gate[t * k_ + s];
          double* nt = &next[std::size_t(t) * H_];
          for (int i = 0; i < H_; ++i) nt[i] += g * out[i];
        }
      }
    });
  }

  // Token t's cached quantities at layer l.
  struct TokenRow {
    Index t = 0;
    const double *z = nullptr, *ex = nullptr, *sig = nullptr, *sig_neg = nullptr, *w = nullptr, *gate = nullptr;
    const int* topk = nullptr;
    double S = 0.0, lse = 0.0, sig_sum = 0.0, a = 0.0, zw = 0.0, topk_sum = 0.0;
  };
  TokenRow tokenRow(int l, Index t) const {
    const LayerCache& c = layers_[l];
    TokenRow r;
    r.t = t;
    r.z = &c.logits[t * E_];
    r.ex = &c.exp_shift[t * E_];
    if (!softmax_) {
      r.sig = &c.sig[t * E_];
      r.sig_neg = &c.sig_neg[t * E_];
      r.sig_sum = c.sig_sum[t];
    }
    const int g = groups_.aux_group[t];
    if (g >= 0) {
      r.w = &c.aux_weight[std::size_t(g) * E_];
      r.a = c.aux_mean[t];
      r.zw = groups_.z_weight[t];
    }
    r.gate = &c.gate[t * k_];
    r.topk = &c.topk[t * k_];
    r.S = c.exp_sum[t];
    r.lse = c.lse[t];
    r.topk_sum = c.topk_sum[t];
    return r;
  }

  // Token t's layer-l aux+z contribution change when z_l[t, j] moves by d, as a difference (module
  // comment), from expm1_d = expm1(d) and expm1_neg_d = expm1(-d). O(1); small enough to be inlined
  // into the element loop.
  double localDelta(const TokenRow& row, int j, double expm1_d, double expm1_neg_d) const {
    const double S = row.S;
    // Change of sum_e exp(z_e - m): only z_j moved.
    const double q = row.ex[j] * expm1_d;
    double delta;
    // a = N / S with N = sum_e w_e num_e: moving one numerator by w_j*q and the denominator by q
    // changes a by q (w_j - a) / (S + q).
    if (softmax_) {
      delta = q * (row.w[j] - row.a) / (S + q);
    } else {
      // p = s / sum s (DESIGN §3); qs = sigma(z_j + d) - sigma(z_j).
      const double qs = sigmoidDelta(row.sig[j], row.sig_neg[j], expm1_neg_d);
      delta = qs * (row.w[j] - row.a) / (row.sig_sum + qs);
    }
    if (row.zw != 0.0) {
      // lse' - lse = log1p(q / S); lse'^2 - lse^2 = (lse' - lse)(lse' + lse).
      const double dl = std::log1p(q / S);
      delta += row.zw * dl * (2.0 * row.lse + dl);
    }
    return delta;
  }

  // Changes dg of token t's k gate weights (routing frozen at the unperturbed top-k) when z_l[t, j]
  // moves by d; false when none moves.
  bool gateDelta(const TokenRow& row, int j, double expm1_d, double expm1_neg_d,
                 const std::vector<char>& in_topk, double* dg) const {
    const double q = row.ex[j] * expm1_d;
    const double qs = softmax_ ? 0.0 : sigmoidDelta(row.sig[j], row.sig_neg[j], expm1_neg_d);
    const int* topk = row.topk;
    const double* gate = row.gate;
    if (softmax_ && !obj_.norm_topk_prob) {
      // g_s = exp(z_s - m) / S: ratio with numerator change q*[s == j] and denominator change q.
      for (int s = 0; s < k_; ++s) dg[s] = q * ((topk[s] == j ? 1.0 : 0.0) - gate[s]) / (row.S + q);
      return true;
    }
    if (!in_topk[j]) return false;  // normalized over the top-k, or sigmoid: unrouted logits do not act
    if (softmax_) {
      // g_s = exp(z_s - m) / sum_topk exp(z - m).
      for (int s = 0; s < k_; ++s) dg[s] = q * ((topk[s] == j ? 1.0 : 0.0) - gate[s]) / (row.topk_sum + q);
    } else if (obj_.norm_topk_prob) {
      for (int s = 0; s < k_; ++s) dg[s] = qs * ((topk[s] == j ? 1.0 : 0.0) - gate[s]) / (row.topk_sum + qs);
    } else {
      for (int s = 0; s < k_; ++s) dg[s] = topk[s] == j ? qs : 0.0;
    }
    return true;
  }

  // Token t's suffix (everything after its layer-l gate weights: h_{l+1}[t] = h_l[t] + sum_s g_s o_s,
  // layers l+1..L-1 with routing frozen, the main loss) depends on z_l[t] only through its k gate
  // weights. Its sensitivities psi_s = d suffix / d g_s are central differences of the suffix
  // recomputed for this one token with g_s moved by +-step/2^level (Richardson as for the logits);
  // psi_flipped[s] records whether a later layer's routing would have changed.
  void suffixGateGradient(int l, Index t, double step, Scratch& scratch) const {
    const LayerCache& c = layers_[l];
    for (int s = 0; s < k_; ++s) {
      const double* out = &c.out[(std::size_t(t) * k_ + s) * H_];
      double D_aux[3], D_main[3];
      bool flipped = false;
      for (int lev = 0; lev < 3; ++lev) {
        const double d = step / double(1 << lev);
        for (int i = 0; i < H_; ++i) scratch.dh[i] = d * out[i];
        const Delta up = propagate(l + 1, t, false, nullptr, 0.0, with_main_, scratch);
        for (int i = 0; i < H_; ++i) scratch.dh[i] = -d * out[i];
        const Delta down = propagate(l + 1, t, false, nullptr, 0.0, with_main_, scratch);
        flipped = flipped || up.routing_changed || down.routing_changed;
        D_aux[lev] = (up.aux - down.aux) / (2.0 * d);
        D_main[lev] = (up.main - down.main) / (2.0 * d);
      }
      const double a1 = (4.0 * D_aux[1] - D_aux[0]) / 3.0, a2 = (4.0 * D_aux[2] - D_aux[1]) / 3.0;
      const double m1 = (4.0 * D_main[1] - D_main[0]) / 3.0, m2 = (4.0 * D_main[2] - D_main[1]) / 3.0;
      scratch.psi_aux[s] = a1;
      scratch.psi_aux_err[s] = std::abs(a1 - a2) * 16.0 / 15.0;
      scratch.psi_main[s] = m1;
      scratch.psi_main_err[s] = std::abs(m1 - m2) * 16.0 / 15.0;
      scratch.psi_flipped[s] = flipped ? 1 : 0;
    }
  }

  // Propagates a change of token t's hidden state (scratch.dh, entering layer l0; taken as zero and
  // not read when dh_zero) and, for the directional checks, a rank-one change eps*V_l of every router
  // weight, through layers l0..L-1 with routing frozen. Returns the change of token t's aux+z
  // contributions (and main, when asked).
  // first_expm1, when given, is expm1(dz) of layer l0 (computed by the caller).
  Delta propagate(int l0, Index t, bool dh_zero, const std::vector<RankOneDirection>* dir, double eps,
                  bool include_main, Scratch& scratch, const double* first_expm1 = nullptr) const {
    Delta delta;
    const bool aux_token = groups_.aux_group[t] >= 0 && has_aux_terms_;
    double* dh = scratch.dh.data();
    double* dz = scratch.dz.data();
    double* em = scratch.em.data();
    double* ds = scratch.ds.data();
    double* dg = scratch.dg.data();
    for (int l = l0; l < L_; ++l) {
      const LayerCache& c = layers_[l];
      const bool later = l < L_ - 1 || include_main;
      if (!aux_token && !later) break;
      // dz = dh W_l (+ eps * V_l applied to the perturbed hidden state).
      const double* given_expm1 = l == l0 ? first_expm1 : nullptr;
      std::fill(dz, dz + E_, 0.0);
      if (!dh_zero && given_expm1 == nullptr) {
        const double* W = data_.router_weight[l].data();
        for (int i = 0; i < H_; ++i) {
          const double dhi = dh[i];
          if (dhi == 0.0) continue;
          const double* row = W + std::size_t(i) * E_;
          for (int e = 0; e < E_; ++e) dz[e] += dhi * row[e];
        }
      }
      if (dir != nullptr && given_expm1 == nullptr) {
        const RankOneDirection& v = (*dir)[l];
        const double hu = v.hidden_dot_u[t] + (dh_zero ? 0.0 : dot(dh, v.u.data(), H_));
        const double scale = eps * v.scale * hu;
        for (int e = 0; e < E_; ++e) dz[e] += scale * v.v[e];
      }
      const double* z = &c.logits[t * E_];
      const double* ex = &c.exp_shift[t * E_];
      const double S = c.exp_sum[t];
      // em_e = exp(z + dz - m) - exp(z - m) = exp(z - m) expm1(dz); sigmoid: ds_e = sigma(z + dz) -
      // sigma(z) from expm1(-dz) = -expm1(dz) / (1 + expm1(dz)).
      double dS = 0.0, dSs = 0.0;
      for (int e = 0; e < E_; ++e) {
        const double raw = given_expm1 ? given_expm1[e] : std::expm1(dz[e]);
        em[e] = ex[e] * raw;
        dS += em[e];
        if (!softmax_) {
          ds[e] = sigmoidDelta(c.sig[t * E_ + e], c.sig_neg[t * E_ + e], -raw / (1.0 + raw));
          dSs += ds[e];
        }
      }
      if (aux_token) {
        const double* w = &c.aux_weight[std::size_t(groups_.aux_group[t]) * E_];
        const double a = c.aux_mean[t];
        // a' - a = sum_e (w_e - a) dnum_e / (S + dS) for a = sum_e w_e num_e / S.
        double acc = 0.0;
        if (softmax_) {
          for (int e = 0; e < E_; ++e) acc += (w[e] - a) * em[e];
          delta.aux += acc / (S + dS);
        } else {
          for (int e = 0; e < E_; ++e) acc += (w[e] - a) * ds[e];
          delta.aux += acc / (c.sig_sum[t] + dSs);
        }
        const double zw = groups_.z_weight[t];
        if (zw != 0.0) {
          const double dl = std::log1p(dS / S);
          delta.aux += zw * dl * (2.0 * c.lse[t] + dl);
        }
      }
      const int* topk = &c.topk[t * k_];
      if (dir == nullptr && routingChanges(z, dz, topk, scratch)) delta.routing_changed = true;
      if (!later) break;
      // Gate changes of the frozen routing (ratios as above).
      const double* gate = &c.gate[t * k_];
      if (softmax_ && !obj_.norm_topk_prob) {
        for (int s = 0; s < k_; ++s) dg[s] = (em[topk[s]] - gate[s] * dS) / (S + dS);
      } else if (softmax_) {
        double dSk = 0.0;
        for (int s = 0; s < k_; ++s) dSk += em[topk[s]];
        for (int s = 0; s < k_; ++s) dg[s] = (em[topk[s]] - gate[s] * dSk) / (c.topk_sum[t] + dSk);
      } else if (obj_.norm_topk_prob) {
        double dSk = 0.0;
        for (int s = 0; s < k_; ++s) dSk += ds[topk[s]];
        for (int s = 0; s < k_; ++s) dg[s] = (ds[topk[s]] - gate[s] * dSk) / (c.topk_sum[t] + dSk);
      } else {
        for (int s = 0; s < k_; ++s) dg[s] = ds[topk[s]];
      }
      // dh_{l+1} = dh + sum_s [(g + dg) (o + do) - g o] = dh + sum_s [dg o + (g + dg) do], with
      // do = (tanh(x + dx) - tanh(x)) B with x = h A_e, dx = dh A_e, and
      // tanh(x + dx) - tanh(x) = tanh(dx) sech^2(x) / (1 + tanh(x) tanh(dx)) (addition theorem).
      double* next = scratch.dh_next.data();
      if (dh_zero) std::fill(next, next + H_, 0.0);
      else std::copy(dh, dh + H_, next);
      for (int s = 0; s < k_; ++s) {
        const double* out = &c.out[(std::size_t(t) * k_ + s) * H_];
        for (int i = 0; i < H_; ++i) next[i] += dg[s] * out[i];
        if (dh_zero) continue;
        const int e = topk[s];
        const double* A = &data_.expert_in[l][std::size_t(e) * H_ * F_];
        const double* Bm = &data_.expert_out[l][std::size_t(e) * F_ * H_];
        const double* act = &c.act[(std::size_t(t) * k_ + s) * F_];
        const double* sech2 = &c.sech2[(std::size_t(t) * k_ + s) * F_];
        double* dpre = scratch.dpre.data();
        double* du = scratch.du.data();
        std::fill(dpre, dpre + F_, 0.0);
        for (int i = 0; i < H_; ++i) {
          const double dhi = dh[i];
          if (dhi == 0.0) continue;
          const double* row = A + std::size_t(i) * F_;
          for (int f = 0; f < F_; ++f) dpre[f] += dhi * row[f];
        }
        for (int f = 0; f < F_; ++f) {
          const double tanh_dx = std::tanh(dpre[f]);
          du[f] = tanh_dx * sech2[f] / (1.0 + act[f] * tanh_dx);
        }
        const double weight = gate[s] + dg[s];
        for (int f = 0; f < F_; ++f) {
          const double a = weight * du[f];
          const double* row = Bm + std::size_t(f) * H_;
          for (int i = 0; i < H_; ++i) next[i] += a * row[i];
        }
      }
      std::swap(scratch.dh, scratch.dh_next);
      dh = scratch.dh.data();
      dh_zero = false;
    }
    if (include_main && !dh_zero && groups_.main_weight[t] != 0.0) {
      // 0.5||r + dh||^2 - 0.5||r||^2 = dh.r + 0.5||dh||^2.
      const double* r = &residual_[std::size_t(t) * H_];
      delta.main = groups_.main_weight[t] * (dot(dh, r, H_) + 0.5 * dot(dh, dh, H_));
    }
    return delta;
  }

  // Would token t's top-k at this layer differ under z + dz? (weakest routed vs best unrouted, ties ->
  // lower index, DESIGN §3)
  bool routingChanges(const double* z, const double* dz, const int* topk, Scratch& scratch) const {
    if (k_ == E_) return false;
    for (int s = 0; s < k_; ++s) scratch.marked[topk[s]] = 1;
    int weakest = topk[0];
    double weakest_value = z[weakest] + dz[weakest];
    for (int s = 1; s < k_; ++s) {
      const int e = topk[s];
      const double v = z[e] + dz[e];
      if (v < weakest_value || (v == weakest_value && e > weakest)) weakest = e, weakest_value = v;
    }
    int best = -1;
    double best_value = -kInf;
    for (int e = 0; e < E_; ++e) {
      if (scratch.marked[e]) continue;
      const double v = z[e] + dz[e];
      if (best < 0 || v > best_value) best = e, best_value = v;
    }
    for (int s = 0; s < k_; ++s) scratch.marked[topk[s]] = 0;
    return best_value > weakest_value || (best_value == weakest_value && best < weakest);
  }

  const ProblemData& data_;
  const ObjectiveDefinition& obj_;
  bool with_main_, last_layer_experts_;
  Index T_ = 0;
  int H_ = 0, E_ = 0, F_ = 0, L_ = 0, k_ = 0;
  bool softmax_ = true, has_aux_terms_ = false;
  TokenGroups groups_;
  std::vector<LayerCache> layers_;
  std::vector<double> final_hidden_;  // h_L (when the last layer's experts are computed)
  std::vector<double> residual_;      // [T, H] h_L - y (with_main)
  double main_value_ = 0.0;
};

// dW = h^T G [H, E] (DESIGN §4 exact chain rule), the second product per layer.
std::vector<double> chainRule(const double* hidden, const std::vector<double>& grad_logits, Index T, int H,
                              int E) {
  std::vector<double> grad(std::size_t(H) * E, 0.0);
  cblas_dgemm(CblasRowMajor, CblasTrans, CblasNoTrans, H, E, int(T), 1.0, hidden, H, grad_logits.data(), E,
              0.0, grad.data(), E);
  return grad;
}

// Error bound carried through dW = h^T G: |sum_t h_ti err_te| <= ||h_{:,i}||_2 ||err_{:,e}||_2.
double chainRuleErrorBound(double max_hidden_column_norm, const std::vector<double>& err, Index T, int E) {
  if (err.empty()) return 0.0;
  std::vector<double> e_norm(E, 0.0);
  for (Index t = 0; t < T; ++t) {
    const double* et = &err[std::size_t(t) * E];
    for (int e = 0; e < E; ++e) e_norm[e] += et[e] * et[e];
  }
  return max_hidden_column_norm * std::sqrt(*std::max_element(e_norm.begin(), e_norm.end()));
}

// One pass over a layer input h [T, H]: returns max_i ||h[:, i]||_2 and fills dots[d][t] = h_t . us[d].
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
      for (std::size_t d = 0; d < n_dirs; ++d) dots[d][t] = dot(ht, us[d], H);
    }
    column_sq[worker] = std::move(sq);
  });
  std::vector<double> total(H, 0.0);
  for (const auto& sq : column_sq)
    for (int i = 0; i < int(sq.size()); ++i) total[i] += sq[i];
  return std::sqrt(*std::max_element(total.begin(), total.end()));
}

}  // namespace

ObjectiveValue evaluateObjective(const ProblemData& data, const ObjectiveDefinition& objective) {
  ReferenceModel model(data, objective, /*with_main=*/true, /*last_layer_experts=*/true);
  model.forward();
  ObjectiveValue value;
  for (int l = 0; l < data.layers; ++l) {
    value.aux += model.layer(l).aux_value;
    value.z += model.layer(l).z_value;
  }
  value.main = model.mainValue();
  return value;
}

ReferenceResult computeReference(const ProblemData& data, const ObjectiveDefinition& objective,
                                 const ReferenceOptions& options) {
  const auto start = std::chrono::steady_clock::now();
  if (!(options.step > 0.0) || !(options.min_step > 0.0) || options.directional_checks < 0)
    throw UsageError("reference options: step > 0, min_step > 0 and directional_checks >= 0 expected");
  // The last layer's experts only matter for the main loss (DESIGN §4 performance note).
  ReferenceModel model(data, objective, options.with_main, options.with_main);
  model.forward();
  const Index T = data.tokens();
  const int H = data.hidden, E = data.experts, L = data.layers;

  // Directional checks: random unit directions, rank one per layer (V_l = scale_l u_l v_l^T with
  // Gaussian u_l, v_l and a Gaussian split of the unit norm over the layers). A rank-one direction
  // makes V_l applied to every token cost O(T H) instead of a third [T,H]x[H,E] product.
  SplitMix64 rng(options.direction_seed);
  std::vector<std::vector<RankOneDirection>> directions(options.directional_checks,
                                                        std::vector<RankOneDirection>(L));
  for (auto& dir : directions) {
    double layer_norm_sq = 0.0;
    std::vector<double> layer_share(L);
    for (int l = 0; l < L; ++l) {
      layer_share[l] = L == 1 ? 1.0 : rng.normal();
      layer_norm_sq += layer_share[l] * layer_share[l];
    }
    for (int l = 0; l < L; ++l) {
      RankOneDirection& d = dir[l];
      d.u.resize(H);
      d.v.resize(E);
      for (auto& value : d.u) value = rng.normal();
      for (auto& value : d.v) value = rng.normal();
      const double nu = std::sqrt(dot(d.u.data(), d.u.data(), H)), nv = std::sqrt(dot(d.v.data(), d.v.data(), E));
      d.scale = layer_share[l] / std::sqrt(layer_norm_sq) / (nu * nv);
      d.hidden_dot_u.resize(T);
    }
  }

  ReferenceResult result;
  result.layers.resize(L);
  result.empty_groups = model.groups().empty_groups;
  for (int l = 0; l < L; ++l) {
    ReferenceLayer& out = result.layers[l];
    out.aux_value = model.layer(l).aux_value;
    out.z_value = model.layer(l).z_value;
    result.aux_value += out.aux_value;
    result.z_value += out.z_value;
    const double* h = model.hidden(l);
    std::vector<const double*> us;
    std::vector<double*> dots;
    for (auto& dir : directions) {
      us.push_back(dir[l].u.data());
      dots.push_back(dir[l].hidden_dot_u.data());
    }
    const double max_column_norm = hiddenPass(h, T, H, us, dots);
    std::vector<double> grad_aux, err_aux, grad_main, err_main;
    model.logitGradients(l, options, grad_aux, err_aux, grad_main, err_main, result.near_ties,
                         result.frozen_elements, result.max_step);
    out.aux_grad = chainRule(h, grad_aux, T, H, E);
    out.aux_fd_error = chainRuleErrorBound(max_column_norm, err_aux, T, E);
    if (options.with_main) {
      out.main_grad = chainRule(h, grad_main, T, H, E);
      out.main_fd_error = chainRuleErrorBound(max_column_norm, err_main, T, E);
    }
    result.fd_error_estimate = std::max(result.fd_error_estimate, out.aux_fd_error);
  }
  if (options.with_main) result.main_value = model.mainValue();

  for (const auto& dir : directions) {
    double logit_scale = 0.0;  // max |h_l[t] . V_l[:, e]|: logit change per unit step
    DirectionalDerivative check_result;
    check_result.direction.resize(L);
    for (int l = 0; l < L; ++l) {
      const RankOneDirection& d = dir[l];
      double max_hu = 0.0, max_v = 0.0;
      for (double value : d.hidden_dot_u) max_hu = std::max(max_hu, std::abs(value));
      for (double value : d.v) max_v = std::max(max_v, std::abs(value));
      logit_scale = std::max(logit_scale, std::abs(d.scale) * max_hu * max_v);
      auto& dense = check_result.direction[l];
      dense.resize(std::size_t(H) * E);
      for (int i = 0; i < H; ++i)
        for (int e = 0; e < E; ++e) dense[std::size_t(i) * E + e] = d.scale * d.u[i] * d.v[e];
    }
    // Largest logit change ~1e-3 at the largest step.
    const double eps = logit_scale > 0.0 ? 1e-3 / logit_scale : 1e-3;
    model.directional(dir, eps, check_result.derivative, check_result.fd_error);
    result.directional.push_back(std::move(check_result));
  }

  result.method =
      "central finite differences per router logit of each token's own contribution, evaluated as "
      "closed-form differences (Richardson h, h/2; error from h/4; steps kept below the top-k "
      "margins; later layers and main loss by per-token suffix recompute with routing frozen, "
      "differentiated along the token's k gate weights) + exact chain rule dJ/dW = h^T dJ/dz; "
      "directional checks along random rank-one unit directions (all tokens and layers, routing "
      "frozen)";
  result.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  return result;
}

}  // namespace moe
