#include "sim/mesh_runner.hpp"

#include <chrono>
#include <exception>
#include <thread>

#include <dlfcn.h>

#include "common/errors.hpp"

namespace moe {

namespace {

// OpenBLAS's own thread count (LibTorch's at::set_num_threads does not reach it). Looked up at run
// time because the system BLAS may be another implementation; returns -1 when it is not OpenBLAS.
int setBlasThreads(int n) {
  using Getter = int (*)();
  using Setter = void (*)(int);
  auto get = reinterpret_cast<Getter>(dlsym(RTLD_DEFAULT, "openblas_get_num_threads"));
  auto set = reinterpret_cast<Setter>(dlsym(RTLD_DEFAULT, "openblas_set_num_threads"));
  if (get == nullptr || set == nullptr) return -1;
  const int previous = get();
  set(n);
  return previous;
}

}  // namespace

MeshGradients runEmulatedMesh(const MeshInputs& inputs, const EmulatedOptions& options) {
  const auto start = std::chrono::steady_clock::now();
  const MeshLayout& layout = inputs.layout;
  const int world = layout.world();
  EmulatedWorld emulated(layout, options);
  std::vector<RankResult> results(world);
  std::vector<std::exception_ptr> errors(world);

  auto runOne = [&](int rank) {
    // Holds a compute slot except while blocked in a collective (EmulatedOptions::compute_slots).
    struct SlotHeld {
      EmulatedWorld& w;
      explicit SlotHeld(EmulatedWorld& world) : w(world) { w.acquireComputeSlot(); }
      ~SlotHeld() { w.releaseComputeSlot(); }
    } slot(emulated);
    try {
      EmulatedCommunicator comm(emulated, rank);
      results[rank] = runRank(inputs, comm);
    } catch (const c10::Error& e) {
      // LibTorch errors carry a C++ backtrace in what(); the user needs the message and the rank.
      errors[rank] = std::make_exception_ptr(
          RuntimeFailure("emulated", rank, "rank program", e.what_without_backtrace()));
      emulated.abort("rank " + std::to_string(rank) + " failed: " + e.what_without_backtrace());
    } catch (const std::exception& e) {
      errors[rank] = std::current_exception();
      emulated.abort("rank " + std::to_string(rank) + " failed: " + e.what());
    }
  };
  if (world == 1) {
    runOne(0);
  } else {
    // Ranks block in collectives, so each needs its own thread; intra-op threading would only
    // oversubscribe the cores, so it is switched off for the duration.
    const int saved_threads = at::get_num_threads();
    at::set_num_threads(1);
    const int saved_blas_threads = setBlasThreads(1);
    std::vector<std::thread> threads;
    threads.reserve(world);
    for (int r = 0; r < world; ++r) threads.emplace_back(runOne, r);
    for (auto& t : threads) t.join();
    at::set_num_threads(saved_threads);
    if (saved_blas_threads > 0) setBlasThreads(saved_blas_threads);
  }
  // Report the first failing rank's own error (not the "aborted" echoes of the others).
  for (int r = 0; r < world; ++r) {
    if (!errors[r]) continue;
    try {
      std::rethrow_exception(errors[r]);
    } catch (const Error&) {
      bool is_echo = false;
      try { std::rethrow_exception(errors[r]); } catch (const std::exception& e) {
        is_echo = std::string(e.what()).find("aborted: ") != std::string::npos;
      }
      if (!is_echo) throw;
    } catch (const std::exception& e) {
      throw RuntimeFailure("emulated", r, "rank program", e.what());
    }
  }
  for (int r = 0; r < world; ++r)
    if (errors[r]) std::rethrow_exception(errors[r]);

  MeshGradients out;
  out.router_grad.resize(layout.layers);
  for (int stage = 0; stage < layout.pp; ++stage) {
    const RankResult& owner = results[layout.rankOf({0, stage, 0})];
    for (const auto& [layer, grad] : owner.router_grad) out.router_grad[layer] = grad;
  }
  out.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  return out;
}

}  // namespace moe
