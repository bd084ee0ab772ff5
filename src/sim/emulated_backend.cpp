#include "sim/emulated_backend.hpp"

#include <algorithm>
#include <chrono>
#include <exception>
#include <thread>

#include "common/blas_threads.hpp"
#include "common/errors.hpp"
#include "sim/rank_program.hpp"

namespace moe {
namespace {

bool isAbortEcho(const std::exception_ptr& error) {
  try {
    std::rethrow_exception(error);
  } catch (const std::exception& e) {
    return std::string(e.what()).find("aborted: ") != std::string::npos;
  }
  return false;
}

}  // namespace

MeshRunResult EmulatedBackend::run(const MeshRequest& request) {
  const auto start = std::chrono::steady_clock::now();
  const MeshInputs inputs = makeMeshInputs(request);
  const MeshLayout& layout = inputs.layout;
  const int world = static_cast<int>(layout.world());
  EmulatedWorld emulated(layout, options_);
  MeshRunResult out;
  out.ranks.resize(world);
  std::vector<std::exception_ptr> errors(world);

  // Ranks block in collectives, so each needs its own thread. The cores are shared out between the
  // rank threads that compute at once (the compute slots): one rank, or fewer ranks than cores, gets
  // several intra-op and BLAS threads each; more ranks than cores get one each, since intra-op
  // threading would then only oversubscribe the cores. LibTorch's OpenMP thread count is a property
  // of the calling thread (and 1 by default on Debian's build), so every rank thread sets its own;
  // OpenBLAS's is global. Restored afterwards.
  const int cores = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  const int slots = options_.compute_slots > 0 ? std::min(options_.compute_slots, cores) : cores;
  const int threads_per_rank = std::max(1, cores / std::min(world, slots));
  const int saved_threads = at::get_num_threads();
  const int saved_blas_threads = setBlasThreads(threads_per_rank);
  const auto runOne = [&](int rank) {
    // Holds a compute slot except while blocked in a collective (EmulatedOptions::compute_slots).
    struct SlotHeld {
      EmulatedWorld& w;
      explicit SlotHeld(EmulatedWorld& world) : w(world) { w.acquireComputeSlot(); }
      ~SlotHeld() { w.releaseComputeSlot(); }
    } slot(emulated);
    try {
      at::set_num_threads(threads_per_rank);
      EmulatedCommunicator comm(emulated, rank);
      out.ranks[rank] = runRank(inputs, comm);
    } catch (const c10::Error& e) {
      // LibTorch errors carry a C++ backtrace in what(); the user needs the message and the rank.
      errors[rank] = std::make_exception_ptr(
          RuntimeFailure(name(), rank, "rank program", e.what_without_backtrace()));
      emulated.abort("rank " + std::to_string(rank) + " failed: " + e.what_without_backtrace());
    } catch (const std::exception& e) {
      errors[rank] = std::current_exception();
      emulated.abort("rank " + std::to_string(rank) + " failed: " + e.what());
    }
  };
  if (world == 1) {
    runOne(0);
  } else {
    std::vector<std::thread> threads;
    threads.reserve(world);
    for (int r = 0; r < world; ++r) threads.emplace_back(runOne, r);
    for (auto& t : threads) t.join();
  }
  at::set_num_threads(saved_threads);
  if (saved_blas_threads > 0) setBlasThreads(saved_blas_threads);
  // Report the first failing rank's own error (not the "aborted" echoes of the others).
  for (int r = 0; r < world; ++r)
    if (errors[r] && !isAbortEcho(errors[r])) {
      try {
        std::rethrow_exception(errors[r]);
      } catch (const Error&) {
        throw;
      } catch (const std::exception& e) {
        throw RuntimeFailure(name(), r, "rank program", e.what());
      }
    }
  for (int r = 0; r < world; ++r)
    if (errors[r]) std::rethrow_exception(errors[r]);
  out.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  return out;
}

}  // namespace moe
