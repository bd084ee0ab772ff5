// Where every rank of a tp x cp x dp x pp mesh sits and which tokens and layers it owns.
//
// Rank order follows Megatron-LM's dense default "tp-cp-ep-dp-pp" (parallel_state.RankGenerator; EP
// is carved out of the tp*cp*dp block, it does not add ranks): tp varies fastest, then cp, dp, pp:
//   rank = t + tp * (c + cp * (d + dp * p)).
// Torch-free.
#pragma once

#include <cstdint>
#include <vector>

#include "scenario/scenario.hpp"

namespace moe {

struct RankCoords {
  int dp = 0, pp = 0, cp = 0, tp = 0;
};

// The process groups a rank uses, named by the axes that vary inside them.
enum class CommGroup {
  kDataParallel,       // dp
  kContext,            // cp
  kDataContext,        // dp x cp: the DDP/FSDP gradient group
  kTensor,             // tp
  kTensorContext,      // tp x cp: Megatron's tp_cp group of the aux statistics
  kTensorDataContext,  // tp x dp x cp: Megatron's tp_dp_cp group of the global aux statistics
  kWorld,
};
const char* toString(CommGroup group);
// Every group kind, in the fixed order in which the distributed backends create them.
const std::vector<CommGroup>& allCommGroups();

// The mesh (sizes, schedule, CP layout) plus the problem dimensions the layout of tokens and layers
// depends on.
struct MeshLayout : MeshConfig {
  int batch = 1, seq_len = 1, layers = 1;

  static MeshLayout fromScenario(const Scenario& scenario);

  int microBatchSize() const { return batch / (dp * microbatches); }
  int chunks() const { return pp * virtual_stages; }         // model chunks over the whole pipeline
  int layersPerChunk() const { return layers / chunks(); }
  int rankOf(const RankCoords& c) const { return c.tp + tp * (c.cp + cp * (c.dp + dp * c.pp)); }
  RankCoords coordsOf(int rank) const;

  // Sequences of DP replica d, microbatch m: [first, first + microBatchSize()).
  int firstSequence(int dp_rank, int microbatch) const {
    return dp_rank * (batch / dp) + microbatch * microBatchSize();
  }
  // Positions of one sequence held by CP rank c, in increasing order. contiguous: the c-th of cp
  // equal chunks; zigzag: chunks c and 2cp-1-c of 2cp equal chunks (the load-balanced layout).
  std::vector<int> cpPositions(int cp_rank) const;
  // Global layer index range [begin, end) of model chunk `virtual_stage` on pipeline rank `stage`.
  // Chunk order along the pipeline: virtual_stage * pp + stage (Megatron's interleaved layout).
  int chunkFirstLayer(int stage, int virtual_stage) const {
    return (virtual_stage * pp + stage) * layersPerChunk();
  }
  // The pipeline stage that owns a layer.
  int stageOfLayer(int layer) const { return (layer / layersPerChunk()) % pp; }
  // A rank's index in its EP group: EP is carved out of the tp*cp*dp block (Megatron's expert grid,
  // torchtitan, NeMo Automodel) or out of dp alone (DeepSpeed), the EP index varying fastest.
  int expertRank(const RankCoords& c, bool carved_from_dp) const {
    return (carved_from_dp ? c.dp : c.tp + tp * (c.cp + cp * c.dp)) % ep;
  }

  // Ranks of the group of `kind` that `rank` belongs to, in group-rank order (rank order).
  std::vector<int> groupMembers(CommGroup kind, int rank) const;
  std::vector<int> dataParallelGroup(int rank) const { return groupMembers(CommGroup::kDataParallel, rank); }
  std::vector<int> contextGroup(int rank) const { return groupMembers(CommGroup::kContext, rank); }
  std::vector<int> dataContextGroup(int rank) const { return groupMembers(CommGroup::kDataContext, rank); }
  std::vector<int> worldGroup() const { return groupMembers(CommGroup::kWorld, 0); }
};

}  // namespace moe
