#include "sim/mesh_layout.hpp"

namespace moe {

MeshLayout MeshLayout::fromScenario(const Scenario& sc) {
  MeshLayout m;
  m.dp = sc.mesh.dp;
  m.pp = sc.mesh.pp;
  m.cp = sc.mesh.cp;
  m.microbatches = sc.mesh.microbatches;
  m.virtual_stages = sc.mesh.virtual_stages;
  m.batch = sc.data.batch;
  m.seq_len = sc.data.seq_len;
  m.layers = sc.model.layers;
  m.cp_layout = sc.mesh.cp_layout;
  return m;
}

RankCoords MeshLayout::coordsOf(int rank) const {
  RankCoords c;
  c.cp = rank % cp;
  c.dp = (rank / cp) % dp;
  c.pp = rank / (cp * dp);
  return c;
}

std::vector<int> MeshLayout::cpPositions(int cp_rank) const {
  std::vector<int> pos;
  if (cp_layout == CpLayout::kContiguous) {
    const int chunk = seq_len / cp;
    for (int s = cp_rank * chunk; s < (cp_rank + 1) * chunk; ++s) pos.push_back(s);
  } else {
    const int chunk = seq_len / (2 * cp);
    for (int s = cp_rank * chunk; s < (cp_rank + 1) * chunk; ++s) pos.push_back(s);
    const int mirror = 2 * cp - 1 - cp_rank;
    for (int s = mirror * chunk; s < (mirror + 1) * chunk; ++s) pos.push_back(s);
  }
  return pos;
}

std::vector<int> MeshLayout::dataParallelGroup(int rank) const {
  const RankCoords me = coordsOf(rank);
  std::vector<int> g;
  for (int d = 0; d < dp; ++d) g.push_back(rankOf({d, me.pp, me.cp}));
  return g;
}

std::vector<int> MeshLayout::contextGroup(int rank) const {
  const RankCoords me = coordsOf(rank);
  std::vector<int> g;
  for (int c = 0; c < cp; ++c) g.push_back(rankOf({me.dp, me.pp, c}));
  return g;
}

std::vector<int> MeshLayout::dataContextGroup(int rank) const {
  const RankCoords me = coordsOf(rank);
  std::vector<int> g;
  for (int d = 0; d < dp; ++d)
    for (int c = 0; c < cp; ++c) g.push_back(rankOf({d, me.pp, c}));
  return g;
}

std::vector<int> MeshLayout::worldGroup() const {
  std::vector<int> g;
  for (int r = 0; r < world(); ++r) g.push_back(r);
  return g;
}

}  // namespace moe
