// The whole of `moe-lbcheck run` on a real-size scenario (issue 11), against a yardstick: the dense
// floating-point work of one forward+backward of the same model (router GEMMs and expert matmuls,
// counted below) divided by the float64 GEMM rate measured in this process on a GEMM of the router's
// shape. Targets: the whole run <= 20x the yardstick, no single mesh run above 3x, peak RSS <= 3 GB.
//
// The run happens in a forked child (its peak RSS, from wait4, is the run's own), through the same
// library call the CLI makes (runChecks with the emulated backend); the child hands its phase times
// back through a pipe.
//
//   bench_run [SCENARIO.json]   (default: bench/scenarios/dsv3-size.json, DeepSeek-V3's router size)
#include <torch/torch.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "app/check_run.hpp"
#include "child_process.hpp"
#include "common/blas_threads.hpp"
#include "scenario/scenario.hpp"
#include "sim/emulated_backend.hpp"

namespace {

using namespace moe;  // a benchmark program: the library's names, unqualified

double secondsSince(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

// Floating-point operations of one forward+backward of the scenario's model over its whole batch,
// counting the dense products only (2 flops per multiply-add), backward = 2x forward (the input and
// the weight gradients):
//   router  z = h W           [n, H] x [H, E]: 2 n H E forward
//   experts tanh(h A_e) B_e   each token's k experts, [H, F] and [F, H]: 4 n k H F forward
double modelFlops(const Scenario& sc) {
  const double n = double(sc.data.batch) * sc.data.seq_len, H = sc.model.hidden, E = sc.model.experts,
               k = sc.model.top_k, F = sc.model.ffn, L = sc.model.layers;
  const double forward = 2 * n * H * E + 4 * n * k * H * F;
  return 3 * forward * L;
}

// The float64 GEMM rate (flop/s) of at::mm on the router's shape [n, H] x [H, E], best of a few, with
// LibTorch's intra-op threads on every core.
double dgemmRate(const Scenario& sc) {
  const int64_t n = int64_t(sc.data.batch) * sc.data.seq_len, H = sc.model.hidden, E = sc.model.experts;
  const at::Tensor a = torch::randn({n, H}, at::kDouble), b = torch::randn({H, E}, at::kDouble);
  double best = 1e300;
  for (int rep = 0; rep < 5; ++rep) {
    const auto t0 = std::chrono::steady_clock::now();
    const at::Tensor c = a.mm(b);
    best = std::min(best, secondsSince(t0));
    if (c.numel() == 0) std::abort();
  }
  return 2.0 * n * H * E / best;
}

struct ChildResult {
  double total_s = 0, load_s = 0, ref_forward_s = 0, ref_gradients_s = 0, ref_directional_s = 0, checks_s = 0;
  double mesh_s[4] = {0, 0, 0, 0};
  char mesh_names[4][16] = {};
  int mesh_count = 0;
  int verdict_ok = 0;
};

// The child: one runChecks, as `moe-lbcheck run SCENARIO` does it.
// The child: the whole run, its phases written to fd as one ChildResult; returns the exit status.
int runChild(const Scenario& sc, int fd) {
  ChildResult r;
  try {
    EmulatedBackend backend;
    const auto t0 = std::chrono::steady_clock::now();
    const CheckRunOutput out = runChecks(sc, backend);
    r.total_s = secondsSince(t0);
    r.load_s = out.phases.load_s;
    r.ref_forward_s = out.phases.reference.forward_s;
    r.ref_gradients_s = out.phases.reference.gradients_s;
    r.ref_directional_s = out.phases.reference.directional_s;
    r.checks_s = out.phases.checks_s;
    for (const auto& [name, s] : out.phases.mesh_runs) {
      if (r.mesh_count == 4) break;
      std::snprintf(r.mesh_names[r.mesh_count], sizeof r.mesh_names[0], "%s", name.c_str());
      r.mesh_s[r.mesh_count++] = s;
    }
    r.verdict_ok = out.report.summary.verdict == Verdict::kPass ? 1 : 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "bench_run: run failed: %s\n", e.what());
    return 3;
  }
  return write(fd, &r, sizeof r) == sizeof r ? 0 : 4;
}

}  // namespace

int main(int argc, char** argv) {
  const std::string path = argc > 1 ? argv[1] : std::string(MOE_BENCH_DIR) + "/scenarios/dsv3-size.json";
  const Scenario sc = loadScenarioFile(path);
  const double flops = modelFlops(sc);
  const double rate = dgemmRate(sc);
  const double yardstick = flops / rate;
  std::printf("# scenario %s: %d x %d tokens, hidden %d, experts %d, top-%d, ffn %d, %d layers, dp %d, M %d\n",
              sc.name.c_str(), sc.data.batch, sc.data.seq_len, sc.model.hidden, sc.model.experts, sc.model.top_k,
              sc.model.ffn, sc.model.layers, sc.mesh.dp, sc.mesh.microbatches);
  std::printf("yardstick: %.1f GFLOP of one forward+backward / %.1f GFLOP/s dgemm (OpenBLAS threads %d) = %.2f s\n",
              flops / 1e9, rate / 1e9, blasThreads(), yardstick);

  ChildResult r;
  const moe::bench::ChildOutcome child = moe::bench::runInChild([&](int fd) { return runChild(sc, fd); }, &r, sizeof r);
  if (!child.ok) {
    std::fprintf(stderr, "bench_run: the run failed (status %d)\n", child.status);
    return 3;
  }
  const double peak_gb = child.peak_bytes / 1e9;
  const auto row = [&](const char* phase, double s) {
    std::printf("  %-28s %8.2f s  %7.2fx\n", phase, s, s / yardstick);
  };
  std::printf("%-30s %8s    %7s\n", "phase", "time", "/yardst.");
  row("load/generate data", r.load_s);
  row("reference forward", r.ref_forward_s);
  row("reference gradients (aux+main)", r.ref_gradients_s);
  row("reference directional", r.ref_directional_s);
  double worst_mesh = 0;
  for (int i = 0; i < r.mesh_count; ++i) {
    row((std::string("mesh run: ") + r.mesh_names[i]).c_str(), r.mesh_s[i]);
    worst_mesh = std::max(worst_mesh, r.mesh_s[i]);
  }
  row("checks and comparisons", r.checks_s);
  row("whole run", r.total_s);
  std::printf("verdict %s\n", r.verdict_ok ? "OK" : "not OK");
  std::printf("whole run / yardstick  %7.2fx (target <= 20)  %s\n", r.total_s / yardstick,
              r.total_s / yardstick <= 20 ? "MET" : "NOT MET");
  std::printf("worst mesh run / yardst. %5.2fx (target <= 3)   %s\n", worst_mesh / yardstick,
              worst_mesh / yardstick <= 3 ? "MET" : "NOT MET");
  std::printf("peak RSS               %7.2f GB (target <= 3)  %s\n", peak_gb, peak_gb <= 3 ? "MET" : "NOT MET");
  return 0;
}
