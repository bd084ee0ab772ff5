#include "sim/rank_program.hpp"

#include <fmt/format.h>

#include "common/errors.hpp"
#include "common/progress.hpp"
#include "sim/schedule.hpp"

namespace moe {
namespace {

at::Tensor tensorFrom(const std::vector<double>& v, std::vector<int64_t> shape, at::ScalarType dtype) {
  return torch::from_blob(const_cast<double*>(v.data()), shape, at::kDouble).to(dtype).contiguous();
}

std::vector<double> doublesOf(const at::Tensor& t) {
  const at::Tensor d = t.detach().to(at::kDouble).contiguous();
  return std::vector<double>(d.data_ptr<double>(), d.data_ptr<double>() + d.numel());
}

std::vector<std::int64_t> longsOf(const at::Tensor& t) {
  const at::Tensor d = t.to(at::kLong).contiguous();
  return std::vector<std::int64_t>(d.data_ptr<int64_t>(), d.data_ptr<int64_t>() + d.numel());
}

// The tokens one rank holds for one microbatch: its CP positions of each of the microbatch's
// sequences, flattened sequence-major.
struct TokenShard {
  at::Tensor index;      // [n] int64 into the B*S token axis
  at::Tensor valid;      // [n] bool: loss tokens
  at::Tensor aux_rows;   // [n_aux] int64: positions of the aux tokens in the shard
  at::Tensor sequence;   // [n] int64: sequence index within the microbatch
  int64_t tokens = 0;
  int64_t first_token = -1;  // index[0] when index is the contiguous range index[0] + [0, n), else -1

  // The shard's rows of a [B*S, ...] tensor: a view when they are one contiguous range (whole
  // sequences: no CP or TP split), else a gathered copy. (At DeepSeek-V3 size each rank's copy of x
  // was 117 MB of the run's peak; the rank program never writes into these rows.)
  at::Tensor rowsOf(const at::Tensor& all) const {
    return first_token >= 0 ? all.narrow(0, first_token, tokens) : all.index_select(0, index);
  }
};

// The positions of one sequence a rank routes: its CP positions, and with TP-sharded router tokens
// (Megatron's sequence parallelism, torchtitan's EP placement) its tp-th contiguous slice of them.
std::vector<int> routedPositions(const MeshInputs& in, const RankCoords& me) {
  std::vector<int> positions = in.layout.cpPositions(me.cp);
  if (!routerTokensShardedOverTp(in.scenario)) return positions;
  const std::size_t per_rank = positions.size() / in.layout.tp;
  return std::vector<int>(positions.begin() + me.tp * per_rank, positions.begin() + (me.tp + 1) * per_rank);
}

TokenShard makeShard(const MeshInputs& in, const RankCoords& me, int microbatch) {
  const MeshLayout& L = in.layout;
  const std::vector<int> positions = routedPositions(in, me);
  const int first = L.firstSequence(me.dp, microbatch);
  std::vector<int64_t> index, sequence;
  for (int b = 0; b < L.microBatchSize(); ++b)
    for (int s : positions) {
      index.push_back(static_cast<int64_t>(first + b) * L.seq_len + s);
      sequence.push_back(b);
    }
  TokenShard shard;
  shard.tokens = static_cast<int64_t>(index.size());
  bool contiguous = !index.empty();
  for (std::size_t i = 1; i < index.size() && contiguous; ++i) contiguous = index[i] == index[0] + int64_t(i);
  if (contiguous) shard.first_token = index[0];
  shard.index = torch::tensor(index, at::kLong);
  shard.sequence = torch::tensor(sequence, at::kLong);
  shard.valid = shard.rowsOf(in.valid);
  // Megatron #1982/#1984: before PR #2121 padding tokens were counted in f and P.
  const bool aux_counts_padding = !in.scenario.aux.exclude_padding || in.convention.has(Fault::kCountPadding);
  const at::Tensor aux_mask = aux_counts_padding ? torch::ones_like(shard.valid) : shard.valid;
  shard.aux_rows = aux_mask.nonzero().squeeze(1);
  return shard;
}

// Token totals every rank needs for its scale factors, obtained the way frameworks get them: local
// counts all-reduced (over CP per microbatch, then over DP for the global batch).
struct TokenTotals {
  std::vector<double> microbatch_valid;  // per microbatch, all CP shards
  std::vector<double> microbatch_aux;
  double global_valid = 0, global_aux = 0;
};

// `shard_group`: the ranks that hold different tokens of one (replica, microbatch): CP, and TP when
// the router tokens are TP-sharded.
TokenTotals countTokens(const std::vector<TokenShard>& shards, Communicator& comm, CommGroup shard_group) {
  const int M = static_cast<int>(shards.size());
  at::Tensor local = torch::zeros({M, 2}, at::kDouble);
  for (int m = 0; m < M; ++m) {
    local[m][0] = shards[m].valid.sum().item<double>();
    local[m][1] = static_cast<double>(shards[m].aux_rows.numel());
  }
  comm.allReduceSum(local, shard_group);
  at::Tensor replica = local.sum(0);
  comm.allReduceSum(replica, CommGroup::kDataParallel);
  TokenTotals t;
  for (int m = 0; m < M; ++m) {
    t.microbatch_valid.push_back(local[m][0].item<double>());
    t.microbatch_aux.push_back(local[m][1].item<double>());
  }
  t.global_valid = replica[0].item<double>();
  t.global_aux = replica[1].item<double>();
  return t;
}

// One forward of a model chunk for one microbatch, kept until its backward.
struct InFlight {
  at::Tensor input;   // received activation (requires grad) or undefined on the first chunk
  at::Tensor output;  // sent activation, or undefined on the last chunk
  at::Tensor loss;    // defined on the last chunk
};

// An all-reduce whose backward all-reduces the gradient too (torch.distributed.nn.all_reduce's
// semantics); the correct statistics all-reduce has an identity backward.
struct SummingAllReduce : public torch::autograd::Function<SummingAllReduce> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, at::Tensor input, int64_t comm_ptr,
                            int64_t group) {
    ctx->saved_data["comm"] = comm_ptr;
    ctx->saved_data["group"] = group;
    at::Tensor out = input.detach().clone();
    reinterpret_cast<Communicator*>(comm_ptr)->allReduceSum(out, static_cast<CommGroup>(group));
    return out;
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    auto* comm = reinterpret_cast<Communicator*>(ctx->saved_data["comm"].toInt());
    at::Tensor g = grads[0].contiguous().clone();
    comm->allReduceSum(g, static_cast<CommGroup>(ctx->saved_data["group"].toInt()));
    return {g, at::Tensor(), at::Tensor()};
  }
};

// Megatron's copy_to_tensor_model_parallel_region: identity forward, all-reduce over TP backward (the
// entry of a TP-split computation fed replicated inputs).
struct CopyToTensorParallel : public torch::autograd::Function<CopyToTensorParallel> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, at::Tensor input, int64_t comm_ptr) {
    ctx->saved_data["comm"] = comm_ptr;
    return input.view_as(input);
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    auto* comm = reinterpret_cast<Communicator*>(ctx->saved_data["comm"].toInt());
    at::Tensor g = grads[0].contiguous().clone();
    comm->allReduceSum(g, CommGroup::kTensor);
    return {g, at::Tensor()};
  }
};

// Megatron's reduce_from_tensor_model_parallel_region: all-reduce over TP forward, identity backward
// (the exit of a TP-split computation whose output is replicated).
struct ReduceFromTensorParallel : public torch::autograd::Function<ReduceFromTensorParallel> {
  static at::Tensor forward(torch::autograd::AutogradContext*, at::Tensor input, int64_t comm_ptr) {
    at::Tensor out = input.detach().contiguous().clone();
    reinterpret_cast<Communicator*>(comm_ptr)->allReduceSum(out, CommGroup::kTensor);
    return out;
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext*,
                                                 torch::autograd::variable_list grads) {
    return {grads[0], at::Tensor()};
  }
};

// The aux statistics of one aux group as a rank holds them: routed counts per expert and the token
// count, already reduced over the group's ranks, the group they were reduced over, and a multiplier
// that a fault's definition of the group puts on the partial loss.
struct GroupStatistics {
  at::Tensor stats;  // [E + 1] float64: counts, then tokens
  CommGroup group = CommGroup::kContext;
  double multiplier = 1.0;
};

class RankProgram {
 public:
  RankProgram(const MeshInputs& in, Communicator& comm)
      : in_(in),
        comm_(comm),
        me_(in.layout.coordsOf(comm.rank())),
        dtype_(in.x.scalar_type()),
        tokens_over_tp_(routerTokensShardedOverTp(in.scenario)),
        experts_over_tp_(in.layout.tp > 1 && !tokens_over_tp_ &&
                         in.convention.preset->router_tokens == RouterTokensOverTp::kShardedWithEp) {}

  RankState run();

 private:
  int chunkIndex(int virtual_stage) const { return virtual_stage * in_.layout.pp + me_.pp; }
  bool isFirstChunk(int v) const { return chunkIndex(v) == 0; }
  bool isLastChunk(int v) const { return chunkIndex(v) == in_.layout.chunks() - 1; }
  int nextRank(int v) const;  // owner of the next chunk, same tp/dp/cp coordinates
  int prevRank(int v) const;
  // Message tag of the activation (direction 0) or activation gradient (1) that model chunk
  // `receiver_chunk` receives for `microbatch`; sender and receiver compute the same value.
  // Direction 2 is the forward-only counts pre-pass.
  int tag(int microbatch, int receiver_chunk, int direction) const {
    return (microbatch * in_.layout.chunks() + receiver_chunk) * 3 + direction;
  }
  ScaleInputs scaleInputs(int microbatch) const;

  void forward(int microbatch, int v);
  void backward(int microbatch, int v);
  at::Tensor layerForward(int layer, const at::Tensor& h, const TokenShard& shard, int microbatch);

  // alpha * (this rank's partial of the layer's aux loss) + beta * (its partial z-loss), scaled per
  // the convention. Counts and token totals are all-reduced without gradient.
  at::Tensor auxAndZLoss(const Routing& r, const TokenShard& shard, int microbatch, int layer);
  // Megatron _apply_seq_aux_loss: one group per sequence, counts all-reduced over CP.
  at::Tensor sequenceAuxLoss(const at::Tensor& probs, const at::Tensor& topk, const TokenShard& shard,
                             const ScaleInputs& scale);
  // Megatron switch_load_balancing_loss_func: one group per microbatch (micro_batch) or one for the
  // whole global batch (global_batch).
  at::Tensor groupAuxLoss(const at::Tensor& probs, const at::Tensor& topk, const ScaleInputs& scale, int layer);
  GroupStatistics microbatchStatistics(const at::Tensor& topk, int64_t rows);
  GroupStatistics globalStatistics(const at::Tensor& topk, int64_t rows, int layer);
  // z-loss (ST-MoE; Megatron z_loss_func): mean over the group's aux tokens of logsumexp(z)^2.
  at::Tensor zLoss(const Routing& r, const TokenShard& shard, int microbatch, const ScaleInputs& scale);

  at::Tensor allReduceWithSummedBackward(const at::Tensor& t, CommGroup group) {
    return SummingAllReduce::apply(t, reinterpret_cast<int64_t>(&comm_), static_cast<int64_t>(group));
  }
  void countGlobalRouting();
  // The group the aux statistics of one aux group are all-reduced over: the ranks holding its tokens.
  CommGroup statisticsGroup(bool global) const;
  // The experts' contribution h + sum_s g_s Expert(h), split over TP where the preset splits it.
  at::Tensor expertsForward(int layer, const at::Tensor& h, const at::Tensor& topk, const at::Tensor& gates,
                            bool gates_summed_over_tp);
  // Which experts this rank's EP group rank holds (for faults that act on the local slots).
  at::Tensor localExpertMask(const at::Tensor& topk) const;
  void recordRouterInput(int layer, int microbatch, const at::Tensor& h, const TokenShard& shard,
                         const at::Tensor& topk);

  const MeshInputs& in_;
  Communicator& comm_;
  RankCoords me_;
  at::ScalarType dtype_;
  // Each TP rank routes its own tokens (the aux statistics and the router gradient are then reduced
  // over TP); else every TP rank routes the same ones.
  bool tokens_over_tp_;
  // torchtitan without EP: the experts are split over TP along the FFN dimension, so each TP rank's
  // main-loss gradient at the gates is a share of the whole (summed over TP by the copy region).
  bool experts_over_tp_;
  TokenTotals totals_;
  std::vector<TokenShard> shards_;  // per microbatch
  std::map<int, at::Tensor> router_weight_;  // owned layers -> leaf with grad
  std::map<std::pair<int, int>, InFlight> in_flight_;
  std::map<int, at::Tensor> global_stats_;    // layer -> [E+1] counts and tokens of the global batch
  std::map<int, at::Tensor> running_counts_;  // stale_token_denominator: running count sums
  std::map<int, int> running_steps_;
  std::vector<RouterInputRecord> recorded_;
};

int RankProgram::nextRank(int v) const {
  const int next_chunk = chunkIndex(v) + 1;
  return in_.layout.rankOf({me_.dp, next_chunk % in_.layout.pp, me_.cp, me_.tp});
}
int RankProgram::prevRank(int v) const {
  const int prev_chunk = chunkIndex(v) - 1;
  return in_.layout.rankOf({me_.dp, prev_chunk % in_.layout.pp, me_.cp, me_.tp});
}

ScaleInputs RankProgram::scaleInputs(int microbatch) const {
  ScaleInputs s;
  s.mesh = in_.layout;
  s.micro_batch_size = in_.layout.microBatchSize();
  s.microbatch_valid_tokens = totals_.microbatch_valid[microbatch];
  s.group_aux_tokens = totals_.microbatch_aux[microbatch];
  s.local_aux_tokens = static_cast<double>(shards_[microbatch].aux_rows.numel());
  s.global_valid_tokens = totals_.global_valid;
  s.exclude_padding = in_.scenario.aux.exclude_padding;
  return s;
}

CommGroup RankProgram::statisticsGroup(bool global) const {
  // The correct group is the token-sharding group (counts all-reduced over exactly the ranks that
  // hold the group's tokens); torchtitan's _reduce_token_partials variant adds TP without EP.
  const bool over_tp = tokens_over_tp_ || in_.convention.has(Fault::kTpReduceWithoutEp);
  if (global) return over_tp ? CommGroup::kTensorDataContext : CommGroup::kDataContext;
  return over_tp ? CommGroup::kTensorContext : CommGroup::kContext;
}

at::Tensor RankProgram::localExpertMask(const at::Tensor& topk) const {
  const MeshLayout& L = in_.layout;
  const int E = in_.scenario.model.experts;
  const int ep_rank = L.expertRank(me_, in_.convention.preset->expert_parallel == ExpertParallelCarve::kData);
  const int per_rank = E / L.ep;
  return (topk >= ep_rank * per_rank) & (topk < (ep_rank + 1) * per_rank);
}

at::Tensor RankProgram::expertsForward(int layer, const at::Tensor& h, const at::Tensor& topk, const at::Tensor& gates,
                                       bool gates_summed_over_tp) {
  const LayerWeights& shared = in_.layers[layer];
  if (!experts_over_tp_) return applyExperts(h, topk, gates, shared);
  // Expert FFN columns [t F/tp, (t+1) F/tp) on TP rank t: the inputs enter through the copy region
  // (their gradients summed over TP), the partial outputs leave through the reduce region.
  const int64_t F = shared.expert_in.size(2), width = F / in_.layout.tp, first = me_.tp * width;
  const LayerWeights shard{shared.router_weight, shared.expert_in.narrow(2, first, width),
                           shared.expert_out.narrow(1, first, width)};
  const int64_t comm = reinterpret_cast<int64_t>(&comm_);
  const at::Tensor h_in = CopyToTensorParallel::apply(h, comm);
  // torchtitan #4054: without the copy region on the gates their gradient keeps this rank's share.
  const at::Tensor g_in = gates_summed_over_tp ? CopyToTensorParallel::apply(gates, comm) : gates;
  return h + ReduceFromTensorParallel::apply(expertOutput(h_in, topk, g_in, shard), comm);
}

at::Tensor RankProgram::sequenceAuxLoss(const at::Tensor& probs, const at::Tensor& topk, const TokenShard& shard,
                                        const ScaleInputs& scale) {
  const int E = in_.scenario.model.experts, k = in_.scenario.model.top_k;
  const int mbs = in_.layout.microBatchSize();
  const at::Tensor seq = shard.sequence.index_select(0, shard.aux_rows);
  const at::Tensor seq_counts = torch::zeros({mbs * E}, at::kDouble)
                                    .index_add_(0, (seq.unsqueeze(1) * E + topk).reshape(-1),
                                                torch::ones({topk.numel()}, at::kDouble));
  const at::Tensor seq_tokens =
      torch::zeros({mbs}, at::kDouble).index_add_(0, seq, torch::ones({seq.numel()}, at::kDouble));
  at::Tensor stats = torch::cat({seq_counts.view({mbs, E}), seq_tokens.unsqueeze(1)}, 1).contiguous();
  comm_.allReduceSum(stats, statisticsGroup(false));
  // P-hat per sequence: sum of this rank's probabilities of that sequence's tokens.
  const at::Tensor p_sum = torch::zeros({mbs, E}, probs.options()).index_add(0, seq, probs);
  const at::Tensor counts = stats.narrow(1, 0, E).to(dtype_);
  at::Tensor tokens = stats.select(1, E).to(dtype_);
  // _apply_seq_aux_loss with a padding mask: every sequence's T is the micro-batch's mean valid length
  // sum(counts) / (k B), so each sequence's term is weighted by (T_b / T_mean)^2.
  if (in_.convention.has(Fault::kSeqAuxMeanValidLength)) tokens = torch::full_like(tokens, 1.0) * (tokens.sum() / mbs);
  const at::Tensor present = tokens > 0;
  // DeepSeek-V3 eqs 17-20 per sequence: E/(k T_b^2) sum_e c_be Phat_be; the mean over the
  // micro-batch's sequences (divided by its size B).
  const at::Tensor per_seq =
      (counts * p_sum).sum(1) * E / (k * torch::where(present, tokens * tokens, torch::ones_like(tokens)));
  return in_.convention.auxValueMultiplier(scale, AuxScope::kSequence) *
         torch::where(present, per_seq, torch::zeros_like(per_seq)).sum() / mbs;
}

GroupStatistics RankProgram::microbatchStatistics(const at::Tensor& topk, int64_t rows) {
  const int E = in_.scenario.model.experts;
  GroupStatistics g;
  g.stats = torch::zeros({E + 1}, at::kDouble);
  g.stats.narrow(0, 0, E).copy_(torch::bincount(topk.reshape(-1), {}, E).to(at::kDouble));
  g.stats[E] = static_cast<double>(rows);
  g.group = statisticsGroup(false);
  comm_.allReduceSum(g.stats, g.group);
  return g;
}

GroupStatistics RankProgram::globalStatistics(const at::Tensor& topk, int64_t rows, int layer) {
  const int E = in_.scenario.model.experts;
  GroupStatistics g;
  g.group = statisticsGroup(true);
  const bool per_microbatch = in_.convention.has(Fault::kBatchWiseCountsPerMicrobatch);
  const bool running = in_.convention.has(Fault::kStaleTokenDenominator);
  if (!per_microbatch && !running) {
    // Exact global-batch counts of every microbatch (counts pre-pass, see countGlobalRouting).
    g.stats = global_stats_.at(layer).clone();
    return g;
  }
  g.stats = torch::zeros({E + 1}, at::kDouble);
  g.stats.narrow(0, 0, E).copy_(torch::bincount(topk.reshape(-1), {}, E).to(at::kDouble));
  g.stats[E] = static_cast<double>(rows);
  comm_.allReduceSum(g.stats, g.group);
  // Both faults average microbatch losses: the objective changes with M.
  g.multiplier = 1.0 / in_.layout.microbatches;
  if (running) {
    // Megatron _apply_global_aux_loss (#7197/#7213): counts accumulate over the accumulation steps
    // (running mean), but T is the current microbatch's token count.
    at::Tensor& sums = running_counts_[layer];
    sums = sums.defined() ? sums + g.stats.narrow(0, 0, E) : g.stats.narrow(0, 0, E).clone();
    const double steps = ++running_steps_[layer];
    g.stats.narrow(0, 0, E).copy_(sums / steps);
  }
  // Otherwise torchtitan PR #3000: counts all-reduced over dp*cp for the current microbatch only.
  return g;
}

at::Tensor RankProgram::groupAuxLoss(const at::Tensor& probs, const at::Tensor& topk, const ScaleInputs& scale,
                                     int layer) {
  const AuxScope scope = in_.scenario.aux.type;
  const int E = in_.scenario.model.experts, k = in_.scenario.model.top_k;
  const int64_t rows = probs.size(0);
  const GroupStatistics g =
      scope == AuxScope::kGlobalBatch ? globalStatistics(topk, rows, layer) : microbatchStatistics(topk, rows);
  const double T = g.stats[E].item<double>();
  if (!(T > 0)) return torch::zeros({}, probs.options());
  const at::Tensor counts = g.stats.narrow(0, 0, E).to(dtype_);
  at::Tensor p_hat = probs.sum(0);
  if (in_.convention.has(Fault::kAutogradAllreduceStats)) {
    // Every rank computes the full group loss from all-reduced P-hat, as Automodel does with DTensor
    // full_tensor(); torch.distributed.nn.all_reduce also all-reduces the gradient in backward,
    // multiplying it by the group size (pytorch #58005).
    p_hat = allReduceWithSummedBackward(p_hat, g.group);
  }
  // E/(k T^2) sum_e c_e sum_t p_te, with c and T of the group.
  const at::Tensor partial = (counts * p_hat).sum() * (double(E) / (k * T * T));
  return in_.convention.auxValueMultiplier(scale, scope) * g.multiplier * partial;
}

at::Tensor RankProgram::zLoss(const Routing& r, const TokenShard& shard, int microbatch, const ScaleInputs& scale) {
  const at::Tensor lse = logsumexpRows(r.logits.index_select(0, shard.aux_rows));
  const at::Tensor sum_sq = (lse * lse).sum();
  if (in_.scenario.aux.z_loss_scope == ZLossScope::kGlobalBatch) {
    if (!(totals_.global_aux > 0)) return torch::zeros({}, r.logits.options());
    return in_.convention.zLossMultiplier(scale, AuxScope::kGlobalBatch) * sum_sq / totals_.global_aux;
  }
  if (in_.convention.has(Fault::kZlossLocalShardMean)) {
    // TopKRouter.apply_z_loss: (beta / |tp_cp|) x the mean over the rank's own valid tokens, summed over
    // the tp_cp ranks: a mean of shard means.
    const double local = scale.local_aux_tokens, group = double(in_.layout.tp) * in_.layout.cp;
    if (!(local > 0)) return torch::zeros({}, r.logits.options());
    return in_.convention.zLossMultiplier(scale, AuxScope::kMicroBatch) * sum_sq / (local * group);
  }
  if (!(totals_.microbatch_aux[microbatch] > 0)) return torch::zeros({}, r.logits.options());
  return in_.convention.zLossMultiplier(scale, AuxScope::kMicroBatch) * sum_sq / totals_.microbatch_aux[microbatch];
}

at::Tensor RankProgram::auxAndZLoss(const Routing& r, const TokenShard& shard, int microbatch, int layer) {
  const ScaleInputs scale = scaleInputs(microbatch);
  at::Tensor value = torch::zeros({}, r.logits.options());
  if (in_.knobs.aux_coeff != 0.0) {
    // NeMo Automodel #1408 item 2: the coefficient was only a "> 0" gate, never multiplied in.
    const double alpha = in_.convention.has(Fault::kCoeffAsGate) ? 1.0 : in_.knobs.aux_coeff;
    const at::Tensor probs = r.aux_probs.index_select(0, shard.aux_rows);  // [n_aux, E]
    const at::Tensor topk = r.topk.index_select(0, shard.aux_rows);
    const at::Tensor aux = in_.scenario.aux.type == AuxScope::kSequence ? sequenceAuxLoss(probs, topk, shard, scale)
                                                                         : groupAuxLoss(probs, topk, scale, layer);
    value = value + alpha * aux;
  }
  if (in_.knobs.z_loss_coeff != 0.0) value = value + in_.knobs.z_loss_coeff * zLoss(r, shard, microbatch, scale);
  return value;
}

void RankProgram::recordRouterInput(int layer, int microbatch, const at::Tensor& h, const TokenShard& shard,
                                    const at::Tensor& topk) {
  RouterInputRecord rec;
  rec.layer = layer;
  rec.microbatch = microbatch;
  rec.rows = doublesOf(h);
  const std::vector<std::int64_t> index = longsOf(shard.index);
  const int64_t S = in_.layout.seq_len;
  for (std::int64_t t : index) {
    rec.sequence.push_back(t / S);
    rec.position.push_back(t % S);
  }
  for (std::int64_t v : longsOf(shard.valid)) rec.valid.push_back(v != 0 ? 1 : 0);
  rec.topk = longsOf(topk);
  recorded_.push_back(std::move(rec));
}

at::Tensor RankProgram::layerForward(int layer, const at::Tensor& h, const TokenShard& shard, int microbatch) {
  const Scenario& sc = in_.scenario;
  // A capture's protocol: the router's own input detached, the experts' input not.
  const at::Tensor router_input = in_.knobs.detach_router_inputs ? h.detach() : h;
  Routing r = routeTokens(router_input, router_weight_.at(layer), sc.model);
  if (in_.record_router_inputs) recordRouterInput(layer, microbatch, h, shard, r.topk);
  at::Tensor gates = r.gates;
  if (in_.knobs.aux_coeff != 0.0 || in_.knobs.z_loss_coeff != 0.0) {
    at::Tensor aux = auxAndZLoss(r, shard, microbatch, layer);
    const bool discard = in_.convention.has(Fault::kDiscardApplyReturn);  // Automodel #1408
    switch (in_.convention.injection()) {
      case Injection::kAutoScaler:
      case Injection::kIdentityFunction: {
        const double scale = in_.convention.auxBackwardScale(scaleInputs(microbatch));
        at::Tensor attached = attachAuxLoss(r.gates, aux, scale);
        if (!discard) gates = attached;
        break;
      }
      case Injection::kLossAdd: {
        InFlight& f = in_flight_[{microbatch, -1}];  // accumulates aux terms for the loss
        if (!discard) f.loss = f.loss.defined() ? f.loss + aux : aux;
        break;
      }
    }
  }
  // HF #48205: under EP a rank's router-score gradient covers only its local experts' slots.
  if (in_.convention.has(Fault::kEpRouterGradLocalSlots))
    gates = torch::where(localExpertMask(r.topk), gates, gates.detach());
  return expertsForward(layer, h, r.topk, gates, !in_.convention.has(Fault::kTpMainGradOneShare));
}

void RankProgram::forward(int microbatch, int v) {
  const MeshLayout& L = in_.layout;
  const TokenShard& shard = shards_[microbatch];
  InFlight f;
  at::Tensor h;
  if (isFirstChunk(v)) {
    h = shard.rowsOf(in_.x);
  } else {
    f.input = torch::empty({shard.tokens, in_.x.size(1)}, in_.x.options());
    comm_.recv(f.input, prevRank(v), tag(microbatch, chunkIndex(v), 0));
    f.input.requires_grad_(true);
    h = f.input;
  }
  const int first = L.chunkFirstLayer(me_.pp, v);
  for (int l = first; l < first + L.layersPerChunk(); ++l) h = layerForward(l, h, shard, microbatch);

  at::Tensor added_aux;  // loss-add conventions: this chunk's aux terms
  auto pending = in_flight_.find({microbatch, -1});
  if (pending != in_flight_.end()) {
    added_aux = pending->second.loss;
    in_flight_.erase(pending);
  }
  if (isLastChunk(v)) {
    const at::Tensor y = shard.rowsOf(in_.y);
    const at::Tensor per_token = 0.5 * (h - y).pow(2).sum(1);
    const at::Tensor main_sum = (per_token * shard.valid.to(per_token.scalar_type())).sum();
    f.loss = in_.knobs.main_loss_weight * in_.convention.mainLossMultiplier(scaleInputs(microbatch)) * main_sum;
  } else {
    f.output = h;
    comm_.send(h.detach(), nextRank(v), tag(microbatch, chunkIndex(v) + 1, 0));
    if (added_aux.defined()) f.loss = torch::zeros({}, h.options());
  }
  if (added_aux.defined()) f.loss = f.loss + added_aux;
  in_flight_[{microbatch, v}] = std::move(f);
}

void RankProgram::backward(int microbatch, int v) {
  InFlight f = std::move(in_flight_.at({microbatch, v}));
  in_flight_.erase({microbatch, v});
  std::vector<at::Tensor> roots, grads;
  if (f.loss.defined() && f.loss.requires_grad()) {
    roots.push_back(f.loss);
    grads.push_back(torch::ones_like(f.loss));
  }
  if (!isLastChunk(v)) {
    at::Tensor grad = torch::empty_like(f.output);
    comm_.recv(grad, nextRank(v), tag(microbatch, chunkIndex(v), 1));
    if (f.output.requires_grad()) {
      roots.push_back(f.output);
      grads.push_back(grad);
    }
  }
  if (!roots.empty()) torch::autograd::backward(roots, grads);
  if (!isFirstChunk(v)) {
    at::Tensor g = f.input.grad();
    if (!g.defined()) g = torch::zeros_like(f.input);
    comm_.send(g, prevRank(v), tag(microbatch, chunkIndex(v) - 1, 1));
  }
}

// Global-batch counts must cover every microbatch before any of them is differentiated, so a
// forward-only pass (no autograd) runs the whole batch through the pipeline first and all-reduces
// the per-layer counts over dp x cp. This is the exact form of the count buffer that the Qwen
// global-batch balancing (arXiv 2501.11873) and torchtitan's BatchWiseLoadBalanceLoss approximate.
void RankProgram::countGlobalRouting() {
  torch::NoGradGuard no_grad;
  const MeshLayout& L = in_.layout;
  const Scenario& sc = in_.scenario;
  const int E = sc.model.experts;
  std::map<int, at::Tensor> local;
  for (int v = 0; v < L.virtual_stages; ++v) {
    const int first = L.chunkFirstLayer(me_.pp, v);
    for (int l = first; l < first + L.layersPerChunk(); ++l) local[l] = torch::zeros({E + 1}, at::kDouble);
    for (int m = 0; m < L.microbatches; ++m) {
      const TokenShard& shard = shards_[m];
      at::Tensor h;
      if (isFirstChunk(v)) {
        h = shard.rowsOf(in_.x);
      } else {
        h = torch::empty({shard.tokens, in_.x.size(1)}, in_.x.options());
        comm_.recv(h, prevRank(v), tag(m, chunkIndex(v), 2));
      }
      for (int l = first; l < first + L.layersPerChunk(); ++l) {
        const Routing r = routeTokens(h, in_.layers[l].router_weight, sc.model);
        const at::Tensor& rows = shard.aux_rows;
        local[l].narrow(0, 0, E).add_(torch::bincount(r.topk.index_select(0, rows).reshape(-1), {}, E).to(at::kDouble));
        local[l][E] += static_cast<double>(rows.numel());
        h = expertsForward(l, h, r.topk, r.gates, true);  // the same arithmetic as the differentiated pass
      }
      if (!isLastChunk(v)) comm_.send(h, nextRank(v), tag(m, chunkIndex(v) + 1, 2));
    }
  }
  for (auto& [layer, stats] : local) {
    comm_.allReduceSum(stats, statisticsGroup(true));
    global_stats_[layer] = stats;
  }
}

RankState RankProgram::run() {
  const MeshLayout& L = in_.layout;
  for (int v = 0; v < L.virtual_stages; ++v) {
    const int first = L.chunkFirstLayer(me_.pp, v);
    for (int l = first; l < first + L.layersPerChunk(); ++l)
      router_weight_[l] = in_.layers[l].router_weight.clone().set_requires_grad(true);
  }
  // This rank's tokens of every microbatch, built once and used by every pass over them.
  for (int m = 0; m < L.microbatches; ++m) shards_.push_back(makeShard(in_, me_, m));
  totals_ = countTokens(shards_, comm_, tokens_over_tp_ ? CommGroup::kTensorContext : CommGroup::kContext);
  if (in_.scenario.aux.type == AuxScope::kGlobalBatch && in_.knobs.aux_coeff != 0.0) countGlobalRouting();
  for (const PipelineAction& a : pipelineSchedule(L.schedule, L.pp, me_.pp, L.microbatches, L.virtual_stages)) {
    if (a.kind == PipelineAction::kForward) forward(a.microbatch, a.virtual_stage);
    else backward(a.microbatch, a.virtual_stage);
    progress::advance();  // one schedule step done: the watchdog sees this rank working
  }
  // The router gradient summed over TP exactly when each TP rank routed its own tokens (Megatron's
  // sequence_parallel attribute, torchtitan's DTensor reduction), then the DDP/FSDP reduction over
  // dp x cp, then the convention's post-hoc scaling.
  const bool sum_over_tp = (tokens_over_tp_ && !in_.convention.has(Fault::kRouterGradNotSummedOverTp)) ||
                           in_.convention.has(Fault::kRouterGradSummedOverTpReplicated);
  const ScaleInputs s = scaleInputs(0);
  RankState result;
  result.rank = comm_.rank();
  result.coords = me_;
  for (auto& [layer, w] : router_weight_) {
    at::Tensor g = w.grad().defined() ? w.grad().detach().clone() : torch::zeros_like(w);
    if (sum_over_tp) comm_.allReduceSum(g, CommGroup::kTensor);
    if (in_.convention.gradReduction() == GradReduction::kMean) g.mul_(1.0 / (L.dp * L.cp));
    comm_.allReduceSum(g, CommGroup::kDataContext);
    g.mul_(in_.convention.postReductionScale(s));
    result.router_grad[layer] = doublesOf(g);
  }
  result.inputs = std::move(recorded_);
  return result;
}

}  // namespace

MeshInputs makeMeshInputs(const MeshRequest& request) {
  const Scenario& sc = *request.scenario;
  const ProblemData& data = *request.data;
  MeshInputs in;
  in.scenario = sc;
  in.layout = MeshLayout::fromScenario(sc);
  in.convention = conventionFor(sc);
  in.knobs = request.knobs;
  in.record_router_inputs = request.record_router_inputs;
  const at::ScalarType dtype = torchDType(sc.model.dtype);
  const int64_t T = data.tokens(), H = data.hidden, E = data.experts, F = data.ffn;
  in.x = tensorFrom(data.x, {T, H}, dtype);
  in.y = tensorFrom(data.y, {T, H}, dtype);
  std::vector<int64_t> valid(data.valid.begin(), data.valid.end());
  in.valid = torch::tensor(valid, at::kLong).to(at::kBool);
  for (int l = 0; l < data.layers; ++l) {
    LayerWeights w;
    w.router_weight = tensorFrom(data.router_weight[l], {H, E}, dtype);
    w.expert_in = tensorFrom(data.expert_in[l], {E, H, F}, dtype);
    w.expert_out = tensorFrom(data.expert_out[l], {E, F, H}, dtype);
    in.layers.push_back(w);
  }
  return in;
}

RankState runRank(const MeshInputs& inputs, Communicator& comm) { return RankProgram(inputs, comm).run(); }

}  // namespace moe
