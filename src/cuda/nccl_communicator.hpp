// The NCCL implementation of the Communicator seam: one process per rank, one GPU per
// rank (device LOCAL_RANK modulo the visible devices), NCCL communicators bootstrapped through the
// same c10d Store the Gloo session uses (the first member of each group publishes its ncclUniqueId
// under "<prefix>/nccl/<group>/<first member>"). Tensors are staged through device buffers: the rank
// program keeps its tensors on the CPU, so every collective copies in, runs on the GPU and copies back.
//
// Built only where the CUDA toolkit and nccl.h are found (MOE_HAVE_CUDA). Without a usable GPU at
// run time every entry point throws RuntimeFailure("nccl", rank, "cudaGetDeviceCount", why).
#pragma once

#include <memory>
#include <string>

#include "sim/communicator.hpp"
#include "sim/mesh_layout.hpp"

namespace c10d {
class Store;
}

namespace moe {

// "" when a CUDA device can be used, else why not (driver missing, no device, build without CUDA).
std::string cudaUnavailableReason();

// Throws RuntimeFailure("nccl", rank, "cudaGetDeviceCount", ...) unless a CUDA device can be used.
void requireCudaDevice(int rank);

// Creates the NCCL communicator of `rank` (collective over all ranks of `layout`). Throws
// UsageError in a build without CUDA/NCCL and RuntimeFailure when no GPU is usable or NCCL fails.
std::unique_ptr<Communicator> makeNcclCommunicator(c10d::Store& store, const std::string& prefix, int rank,
                                                   int local_rank, const MeshLayout& layout);

}  // namespace moe
