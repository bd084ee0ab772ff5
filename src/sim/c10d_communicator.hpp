// The Communicator seam over torch c10d ProcessGroupGloo: one process per rank, CPU
// tensors, process groups rendezvoused through a c10d Store (a TCPStore in practice).
//
// Groups. One world group plus, for every kind the rank program uses (allCommGroups(): dp, cp, dp*cp,
// tp, tp*cp, tp*dp*cp), the group of that kind this rank belongs to, with the members MeshLayout
// gives (Megatron-LM's dense rank order, tp fastest, then cp, dp, pp). Group-rank i of a group is its
// i-th member in that order. c10d group creation is collective over the group's members, so every
// process creates its groups in one fixed global order (allCommGroups()). The groups of one kind
// partition the ranks, so all members of a group reach its creation together and no order can
// deadlock. Each group rendezvouses under its own c10d::PrefixStore prefix ("<prefix>/pg/<kind>/<first
// member>"), so a process never has to create a group it is not a member of (torch.distributed.
// new_group needs that only because it numbers groups with a global counter). Groups of one member
// are not created: an all-reduce over one rank is the identity.
//
// Collectives. allReduceSum on float64 tensors is c10d's Gloo allreduce (SUM): its ring sums in a
// different order than the emulated backend, so the two agree to float64 rounding, not bitwise.
// Other dtypes (Gloo in LibTorch 1.13 has no bfloat16 allreduce, and a ring's order would differ at
// that dtype's much coarser rounding) are all-gathered as raw bytes and summed locally in group-rank
// order in the tensor's dtype, which is exactly what the emulated backend computes. Gloo has no
// reduce_scatter in 1.13; the rank program does not need one.
//
// Point to point. send() is asynchronous, like the emulated backend's mailbox: Gloo's send
// completes only once the receiver has posted the matching recv, and the pipeline schedules send
// an activation before receiving the next gradient, so a blocking send could deadlock two stages.
// The sent tensor is copied and kept with its c10d Work until flushSends() (called at the end of
// every mesh run, and by barrier()) waits for all of them. recv() blocks.
//
// Failures. Every c10d call is bounded by the timeout (C10dOptions::timeout; the runner reads
// MOE_LBCHECK_TIMEOUT_S, default 60 s) and every failure (a peer that exited: "Connection closed by
// peer", a timeout, a size mismatch) throws RuntimeFailure("gloo", rank, "<operation>", what),
// e.g. "gloo rank 1 allReduceSum(dp group): ... (group members: ranks 0, 1)". After a failure the
// communicator refuses further calls, and its destructor deliberately leaks the process groups:
// tearing down a Gloo context with operations still pending on a dead peer can block, and the
// process is about to exit anyway.
#pragma once

#include <chrono>
#include <memory>
#include <string>

#include <torch/csrc/distributed/c10d/Store.hpp>

#include "sim/communicator.hpp"
#include "sim/mesh_layout.hpp"

namespace moe {

// The timeout of every distributed operation: MOE_LBCHECK_TIMEOUT_S (seconds, > 0, may be
// fractional) when set, else 60 s. A malformed value throws UsageError.
std::chrono::milliseconds distributedTimeout();

// True when this build has the c10d Gloo backend (MOE_HAVE_GLOO).
bool glooAvailable();

struct C10dOptions {
  std::chrono::milliseconds timeout{60000};
  // Where Gloo binds its sockets: an interface name (GLOO_SOCKET_IFNAME's role) or, when empty, a
  // hostname/address; both empty: the host's default address (c10d's createDefaultDevice).
  std::string interface;
  std::string hostname;
  std::string prefix = "moe-lbcheck";  // store key prefix of the process groups
};

class C10dCommunicator : public Communicator {
 public:
  // Collective over all layout.world() processes: creates the world group and this rank's dp, cp
  // and dp*cp groups (see the order above). Throws RuntimeFailure naming the group on failure.
  C10dCommunicator(const c10::intrusive_ptr<c10d::Store>& store, int rank, const MeshLayout& layout,
                   const C10dOptions& options = {});
  ~C10dCommunicator() override;
  C10dCommunicator(const C10dCommunicator&) = delete;
  C10dCommunicator& operator=(const C10dCommunicator&) = delete;

  int rank() const override;
  int size() const override;
  std::string backend() const override { return "gloo"; }
  void allReduceSum(at::Tensor& tensor, CommGroup group) override;
  void send(const at::Tensor& tensor, int dst_rank, int tag) override;
  void recv(at::Tensor& tensor, int src_rank, int tag) override;
  void barrier() override;  // flushes the pending sends, then a world barrier

  // Waits until every send issued so far has been received; throws RuntimeFailure on failure.
  void flushSends() override;
  // True once an operation has failed (the communicator is then unusable).
  bool failed() const;
  std::chrono::milliseconds timeout() const;

  struct Impl;

 private:
  std::unique_ptr<Impl> impl_;
};

}  // namespace moe
