// The one communication seam of the mesh, in the spirit of c10d's Backend: a rank, a size, sum
// all-reduce over the rank's process groups, point-to-point send/recv, barrier. Implementations:
// EmulatedCommunicator (all ranks as threads of one process, real arithmetic), C10dCommunicator (one
// process per rank, ProcessGroupGloo) and the NCCL one in src/cuda. Every call blocks until it is
// complete for this rank; failures and time-outs throw RuntimeFailure naming the backend, rank and
// operation.
#pragma once

#include <string>

#include "sim/mesh_layout.hpp"

namespace at {
class Tensor;
}

namespace moe {

class Communicator {
 public:
  virtual ~Communicator() = default;
  virtual int rank() const = 0;
  virtual int size() const = 0;
  virtual std::string backend() const = 0;
  // Replaces `tensor` (contiguous, CPU) by the sum over the members of this rank's `group`. Every
  // member receives bit-identical values.
  virtual void allReduceSum(at::Tensor& tensor, CommGroup group) = 0;
  // Delivers a copy of `tensor` to `dst_rank`; `tag` pairs it with the matching recv.
  virtual void send(const at::Tensor& tensor, int dst_rank, int tag) = 0;
  // Fills the preallocated `tensor` with what `src_rank` sent under `tag`.
  virtual void recv(at::Tensor& tensor, int src_rank, int tag) = 0;
  virtual void barrier() = 0;
  // Completes every send issued so far. Backends whose send returns before the peer receives
  // (Gloo, NCCL) keep the data alive until this call; for the emulated backend it does nothing.
  virtual void flushSends() {}
};

}  // namespace moe
