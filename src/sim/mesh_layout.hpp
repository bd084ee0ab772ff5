// Where every rank of a dp x pp x cp mesh sits and which tokens and layers it owns (DESIGN §3).
//
// Rank order follows Megatron-LM's default "tp-cp-ep-dp-pp" (tp = ep = 1 here): cp varies fastest,
// then dp, then pp:  rank = c + cp * (d + dp * p).
#pragma once

#include <cstdint>
#include <vector>

#include "scenario/scenario.hpp"

namespace moe {

struct RankCoords {
  int dp = 0, pp = 0, cp = 0;
};

struct MeshLayout {
  int dp = 1, pp = 1, cp = 1, microbatches = 1, virtual_stages = 1;
  int batch = 1, seq_len = 1, layers = 1;
  CpLayout cp_layout = CpLayout::kContiguous;

  static MeshLayout fromScenario(const Scenario& scenario);

  int world() const { return dp * pp * cp; }
  int microBatchSize() const { return batch / (dp * microbatches); }
  int chunks() const { return pp * virtual_stages; }         // model chunks over the whole pipeline
  int layersPerChunk() const { return layers / chunks(); }
  int rankOf(const RankCoords& c) const { return c.cp + cp * (c.dp + dp * c.pp); }
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

  // Ranks of the groups a rank belongs to, in group-rank order.
  std::vector<int> dataParallelGroup(int rank) const;
  std::vector<int> contextGroup(int rank) const;
  std::vector<int> dataContextGroup(int rank) const;
  std::vector<int> worldGroup() const;
};

}  // namespace moe
