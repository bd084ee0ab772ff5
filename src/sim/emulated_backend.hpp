// The emulated mesh backend: every rank of the mesh is a thread of this process running the same
// rank program a real rank runs, over EmulatedCommunicator (real arithmetic for every collective,
// summed in group-rank order).
#pragma once

#include "sim/emulated_communicator.hpp"
#include "sim/mesh_backend.hpp"

namespace moe {

class EmulatedBackend : public MeshBackend {
 public:
  explicit EmulatedBackend(EmulatedOptions options = {}) : options_(options) {}
  std::string name() const override { return "emulated"; }
  // Throws RuntimeFailure if any rank fails (the others are aborted, never left waiting).
  MeshRunResult run(const MeshRequest& request) override;

 private:
  EmulatedOptions options_;
};

}  // namespace moe
