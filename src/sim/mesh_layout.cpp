#include "sim/mesh_layout.hpp"

namespace moe {

const char* toString(CommGroup group) {
  switch (group) {
    case CommGroup::kDataParallel: return "dp";
    case CommGroup::kContext: return "cp";
    case CommGroup::kDataContext: return "dp*cp";
    case CommGroup::kTensor: return "tp";
    case CommGroup::kTensorContext: return "tp*cp";
    case CommGroup::kTensorDataContext: return "tp*dp*cp";
    case CommGroup::kWorld: return "world";
  }
  return "?";
}

const std::vector<CommGroup>& allCommGroups() {
  static const std::vector<CommGroup> groups = {CommGroup::kWorld,         CommGroup::kDataParallel,
                                                CommGroup::kContext,       CommGroup::kDataContext,
                                                CommGroup::kTensor,        CommGroup::kTensorContext,
                                                CommGroup::kTensorDataContext};
  return groups;
}

MeshLayout MeshLayout::fromScenario(const Scenario& sc) {
  MeshLayout m;
  static_cast<MeshConfig&>(m) = sc.mesh;
  m.batch = sc.data.batch;
  m.seq_len = sc.data.seq_len;
  m.layers = sc.model.layers;
  return m;
}

RankCoords MeshLayout::coordsOf(int rank) const {
  RankCoords c;
  c.tp = rank % tp;
  c.cp = (rank / tp) % cp;
  c.dp = (rank / (tp * cp)) % dp;
  c.pp = rank / (tp * cp * dp);
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

std::vector<int> MeshLayout::groupMembers(CommGroup kind, int rank) const {
  const RankCoords me = coordsOf(rank);
  bool vary_tp = false, vary_cp = false, vary_dp = false, vary_pp = false;
  switch (kind) {
    case CommGroup::kDataParallel: vary_dp = true; break;
    case CommGroup::kContext: vary_cp = true; break;
    case CommGroup::kDataContext: vary_dp = vary_cp = true; break;
    case CommGroup::kTensor: vary_tp = true; break;
    case CommGroup::kTensorContext: vary_tp = vary_cp = true; break;
    case CommGroup::kTensorDataContext: vary_tp = vary_dp = vary_cp = true; break;
    case CommGroup::kWorld: vary_tp = vary_cp = vary_dp = vary_pp = true; break;
  }
  std::vector<int> members;
  for (int p = vary_pp ? 0 : me.pp; p < (vary_pp ? pp : me.pp + 1); ++p)
    for (int d = vary_dp ? 0 : me.dp; d < (vary_dp ? dp : me.dp + 1); ++d)
      for (int c = vary_cp ? 0 : me.cp; c < (vary_cp ? cp : me.cp + 1); ++c)
        for (int t = vary_tp ? 0 : me.tp; t < (vary_tp ? tp : me.tp + 1); ++t) members.push_back(rankOf({d, p, c, t}));
  return members;
}

}  // namespace moe
