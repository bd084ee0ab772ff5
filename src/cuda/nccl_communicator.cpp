#include "cuda/nccl_communicator.hpp"

#include <fmt/format.h>

#include "common/errors.hpp"

#ifdef MOE_HAVE_CUDA
#include <cuda_runtime.h>
#include <nccl.h>
#include <torch/csrc/distributed/c10d/Store.hpp>

#include <map>
#include <vector>
#endif

namespace moe {

#ifndef MOE_HAVE_CUDA

std::string cudaUnavailableReason() { return "this build has no CUDA/NCCL support (toolkit not found at configure time)"; }

void requireCudaDevice(int rank) {
  throw RuntimeFailure("nccl", rank, "cudaGetDeviceCount", cudaUnavailableReason() + "; use --backend gloo");
}

std::unique_ptr<Communicator> makeNcclCommunicator(c10d::Store&, const std::string&, int rank, int,
                                                   const MeshLayout&) {
  requireCudaDevice(rank);
  return nullptr;
}

#else

std::string cudaUnavailableReason() {
  int count = 0;
  const cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess)
    return fmt::format("cudaGetDeviceCount failed: {} ({})", cudaGetErrorString(err), static_cast<int>(err));
  if (count == 0) return "no CUDA device is visible";
  return "";
}

void requireCudaDevice(int rank) {
  const std::string why = cudaUnavailableReason();
  if (!why.empty())
    throw RuntimeFailure("nccl", rank, "cudaGetDeviceCount",
                         why + ": the nccl backend needs one GPU per rank; use --backend gloo or emulated");
}

namespace {

void checkCuda(cudaError_t err, int rank, const std::string& op) {
  if (err != cudaSuccess) throw RuntimeFailure("nccl", rank, op, cudaGetErrorString(err));
}

void checkNccl(ncclResult_t res, int rank, const std::string& op) {
  if (res != ncclSuccess) throw RuntimeFailure("nccl", rank, op, ncclGetErrorString(res));
}

ncclDataType_t ncclTypeOf(const at::Tensor& t, int rank, const std::string& op) {
  switch (t.scalar_type()) {
    case at::kDouble: return ncclFloat64;
    case at::kFloat: return ncclFloat32;
    case at::kBFloat16: return ncclBfloat16;
    case at::kLong: return ncclInt64;
    default: throw RuntimeFailure("nccl", rank, op, "unsupported dtype " + std::string(c10::toString(t.scalar_type())));
  }
}

// A device buffer that grows on demand.
struct DeviceBuffer {
  void* ptr = nullptr;
  size_t bytes = 0;
  void* reserve(size_t n, int rank) {
    if (n > bytes) {
      if (ptr != nullptr) cudaFree(ptr);
      checkCuda(cudaMalloc(&ptr, n), rank, "cudaMalloc");
      bytes = n;
    }
    return ptr;
  }
  ~DeviceBuffer() {
    if (ptr != nullptr) cudaFree(ptr);
  }
};

class NcclCommunicator : public Communicator {
 public:
  NcclCommunicator(c10d::Store& store, const std::string& prefix, int rank, int local_rank,
                   const MeshLayout& layout)
      : rank_(rank), layout_(layout) {
    int devices = 0;
    checkCuda(cudaGetDeviceCount(&devices), rank, "cudaGetDeviceCount");
    checkCuda(cudaSetDevice(local_rank % devices), rank, "cudaSetDevice");
    checkCuda(cudaStreamCreate(&stream_), rank, "cudaStreamCreate");
    checkCuda(cudaStreamCreate(&send_stream_), rank, "cudaStreamCreate");
    // Every group kind in the fixed global order (allCommGroups(): world first), each from its own
    // unique id in the store.
    for (const CommGroup kind : allCommGroups())
      groups_[kind] = initGroup(store, prefix, toString(kind), layout.groupMembers(kind, rank));
    world_ = groups_.at(CommGroup::kWorld);
  }
  ~NcclCommunicator() override {
    for (auto& [group, comm] : groups_)
      if (comm != nullptr && comm != world_) ncclCommDestroy(comm);
    if (world_ != nullptr) ncclCommDestroy(world_);
    cudaStreamDestroy(stream_);
    cudaStreamDestroy(send_stream_);
  }

  int rank() const override { return rank_; }
  int size() const override { return layout_.world(); }
  std::string backend() const override { return "nccl"; }

  void allReduceSum(at::Tensor& tensor, CommGroup group) override {
    const std::string op = fmt::format("allReduceSum({} group)", toString(group));
    at::Tensor host = tensor.contiguous();
    const size_t bytes = host.numel() * host.element_size();
    void* dev = buffer_.reserve(bytes, rank_);
    checkCuda(cudaMemcpyAsync(dev, host.data_ptr(), bytes, cudaMemcpyHostToDevice, stream_), rank_, op);
    checkNccl(ncclAllReduce(dev, dev, host.numel(), ncclTypeOf(host, rank_, op), ncclSum, groups_.at(group),
                            stream_),
              rank_, op);
    checkCuda(cudaMemcpyAsync(host.data_ptr(), dev, bytes, cudaMemcpyDeviceToHost, stream_), rank_, op);
    checkCuda(cudaStreamSynchronize(stream_), rank_, op);
    if (!host.is_same(tensor)) tensor.copy_(host);
  }

  // Enqueued on its own stream and completed by flushSends(), like Gloo's send: a pipeline stage
  // that sends before it receives must not wait for the peer.
  void send(const at::Tensor& tensor, int dst_rank, int /*tag*/) override {
    const std::string op = fmt::format("send(to {})", dst_rank);
    at::Tensor host = tensor.detach().contiguous();
    const size_t bytes = host.numel() * host.element_size();
    pending_.emplace_back();
    void* dev = pending_.back().reserve(bytes, rank_);
    checkCuda(cudaMemcpyAsync(dev, host.data_ptr(), bytes, cudaMemcpyHostToDevice, send_stream_), rank_, op);
    checkNccl(ncclSend(dev, host.numel(), ncclTypeOf(host, rank_, op), dst_rank, world_, send_stream_), rank_, op);
    checkCuda(cudaStreamSynchronize(send_stream_), rank_, op);  // host copy may be freed after this
  }

  void recv(at::Tensor& tensor, int src_rank, int /*tag*/) override {
    const std::string op = fmt::format("recv(from {})", src_rank);
    at::Tensor host = tensor.contiguous();
    const size_t bytes = host.numel() * host.element_size();
    void* dev = buffer_.reserve(bytes, rank_);
    checkNccl(ncclRecv(dev, host.numel(), ncclTypeOf(host, rank_, op), src_rank, world_, stream_), rank_, op);
    checkCuda(cudaMemcpyAsync(host.data_ptr(), dev, bytes, cudaMemcpyDeviceToHost, stream_), rank_, op);
    checkCuda(cudaStreamSynchronize(stream_), rank_, op);
    if (!host.is_same(tensor)) tensor.copy_(host);
  }

  void barrier() override {
    at::Tensor token = at::zeros({1}, at::kDouble);
    allReduceSum(token, CommGroup::kWorld);
  }

  void flushSends() override {
    checkCuda(cudaStreamSynchronize(send_stream_), rank_, "flushSends");
    pending_.clear();
  }

 private:
  ncclComm_t initGroup(c10d::Store& store, const std::string& prefix, const std::string& name,
                       const std::vector<int>& members) {
    const std::string op = "ncclCommInitRank(" + name + " group)";
    int index = 0;
    while (members[index] != rank_) ++index;
    const std::string key = fmt::format("{}/nccl/{}/{}", prefix, name, members.front());
    ncclUniqueId id;
    if (index == 0) {
      checkNccl(ncclGetUniqueId(&id), rank_, op);
      store.set(key, std::vector<uint8_t>(reinterpret_cast<uint8_t*>(&id), reinterpret_cast<uint8_t*>(&id) + sizeof id));
    } else {
      const std::vector<uint8_t> bytes = store.get(key);
      if (bytes.size() != sizeof id) throw RuntimeFailure("nccl", rank_, op, "malformed ncclUniqueId in the store");
      std::copy(bytes.begin(), bytes.end(), reinterpret_cast<uint8_t*>(&id));
    }
    ncclComm_t comm = nullptr;
    checkNccl(ncclCommInitRank(&comm, static_cast<int>(members.size()), id, index), rank_, op);
    return comm;
  }

  int rank_;
  MeshLayout layout_;
  cudaStream_t stream_{}, send_stream_{};
  ncclComm_t world_ = nullptr;
  std::map<CommGroup, ncclComm_t> groups_;
  DeviceBuffer buffer_;
  std::vector<DeviceBuffer> pending_;
};

}  // namespace

std::unique_ptr<Communicator> makeNcclCommunicator(c10d::Store& store, const std::string& prefix, int rank,
                                                   int local_rank, const MeshLayout& layout) {
  requireCudaDevice(rank);
  return std::make_unique<NcclCommunicator>(store, prefix, rank, local_rank, layout);
}

#endif

}  // namespace moe
