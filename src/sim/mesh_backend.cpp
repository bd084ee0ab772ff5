#include "sim/mesh_backend.hpp"

#include <stdexcept>
#include <string>

namespace moe {

const std::vector<double>& MeshRunResult::gradientOf(int layer) const {
  for (const RankState& r : ranks) {
    const auto it = r.router_grad.find(layer);
    if (it != r.router_grad.end()) return it->second;
  }
  throw std::logic_error("mesh run: no rank holds layer " + std::to_string(layer));
}

std::vector<std::vector<double>> MeshRunResult::layerGradients(int layers) const {
  std::vector<std::vector<double>> out;
  for (int l = 0; l < layers; ++l) out.push_back(gradientOf(l));
  return out;
}

}  // namespace moe
