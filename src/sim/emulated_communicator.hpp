// All ranks of a mesh as threads of one process (like PyTorch's LocalTensor, not a fake process
// group): every collective does its real arithmetic, summing contributions in group-rank order so
// results are deterministic whatever the thread timing.
#pragma once

#include <chrono>
#include <condition_variable>
#include <map>
#include <memory>
#include <mutex>
#include <vector>

#include "sim/communicator.hpp"
#include "sim/mesh_layout.hpp"

namespace moe {

struct EmulatedOptions {
  std::chrono::milliseconds timeout{120000};  // a collective waiting longer than this throws
  // Rank threads allowed to compute at once (0 = the number of cores). A rank gives its slot up
  // while it waits in a collective. Bounding the concurrency keeps the cores busy without
  // oversubscription and keeps the number of threads inside OpenBLAS at once small (its buffer
  // table is sized for the core count: 1024 concurrent callers corrupt its heap).
  int compute_slots = 0;
};

// State shared by the ranks of one emulated mesh. Create one per run; give each rank thread its own
// EmulatedCommunicator.
class EmulatedWorld {
 public:
  EmulatedWorld(const MeshLayout& layout, EmulatedOptions options = {});
  ~EmulatedWorld();
  const MeshLayout& layout() const { return layout_; }
  // Makes every blocked and future call fail (used when one rank has thrown).
  void abort(const std::string& why);

  // A compute slot held by a rank thread while it computes (see EmulatedOptions::compute_slots).
  void acquireComputeSlot();
  void releaseComputeSlot();

  struct Impl;  // rendezvous slots and mailboxes (emulated_communicator.cpp)

 private:
  friend class EmulatedCommunicator;
  MeshLayout layout_;
  EmulatedOptions options_;
  std::mutex slot_mutex_;
  std::condition_variable slot_freed_;
  int free_slots_ = 1;
  std::unique_ptr<Impl> impl_;
};

class EmulatedCommunicator : public Communicator {
 public:
  EmulatedCommunicator(EmulatedWorld& world, int rank) : world_(world), rank_(rank) {}
  int rank() const override { return rank_; }
  int size() const override { return world_.layout().world(); }
  std::string backend() const override { return "emulated"; }
  void allReduceSum(at::Tensor& tensor, CommGroup group) override;
  void send(const at::Tensor& tensor, int dst_rank, int tag) override;
  void recv(at::Tensor& tensor, int src_rank, int tag) override;
  void barrier() override;

 private:
  EmulatedWorld& world_;
  int rank_;
};

}  // namespace moe
