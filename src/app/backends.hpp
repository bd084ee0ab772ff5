// The one factory of mesh backends the CLI asks: it names the backends and runs a leader function
// with the chosen one, in whatever role this process has. Torch-free header.
#pragma once

#include <functional>
#include <string>
#include <vector>

#include "scenario/scenario.hpp"
#include "sim/mesh_backend.hpp"

namespace moe {

struct BackendOptions {
  std::string name = "emulated";  // one of backendNames()
  int nproc = 0;                  // gloo/nccl: processes to launch (0 = the mesh's world size)
};

// "emulated", "gloo", "nccl".
const std::vector<std::string>& backendNames();

// Runs `leader` exactly once in exactly one process, with the backend of `options`, and returns this
// process's exit code:
//  * emulated: in this process;
//  * gloo, nccl under a launcher (torchrun, srun, mpirun, or moe-lbcheck's own): this process is one
//    rank; rank 0 runs `leader`, the other ranks serve its mesh runs;
//  * gloo, nccl without one: this process launches the ranks of its own command line on loopback and
//    returns their common exit code (`leader` runs in rank 0's process).
// Throws UsageError for an unknown backend, --nproc with emulated, or a launcher environment that does
// not match the mesh; RuntimeFailure when nccl has no usable GPU.
int runWithMeshBackend(const BackendOptions& options, const Scenario& scenario,
                       const std::function<int(MeshBackend&)>& leader);

}  // namespace moe
