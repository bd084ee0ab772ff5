// Emulation cost against the single-device run of the same scenario (issue 3, item 7; tightened by
// issue 11, item 3): a 4096-rank mesh (dp=1024, pp=2, cp=2 by default) in one process should cost
// about what one device costs on the same global batch (<= 1.2x), and its memory should not grow
// with the rank count beyond the activations in flight (<= 1.1x). Each measurement runs in a forked
// child so that its peak RSS is its own.
//
//   bench_emulation [--dp 1024 --pp 2 --cp 2 --mb 1] [--seq 256 --hidden 128 --experts 16 --ffn 128]
//                   [--only single|mesh]
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>

#include "child_process.hpp"
#include "data/problem.hpp"
#include "sim/emulated_backend.hpp"

namespace {

struct Measurement {
  double seconds = 0;
  double peak_mib = 0;
};

// Runs the aux-only mesh run of `sc` in a child process; returns its wall time and peak RSS.
Measurement measureInChild(const moe::Scenario& sc) {
  Measurement m;
  const moe::bench::ChildOutcome child = moe::bench::runInChild(
      [&](int fd) {
        const moe::ProblemData data = moe::generateProblem(sc);
        moe::MeshRequest request;
        request.scenario = &sc;
        request.data = &data;
        request.knobs = {0.0, sc.aux.coeff, 0.0, false};
        moe::EmulatedBackend backend;
        const auto t0 = std::chrono::steady_clock::now();
        const moe::MeshRunResult g = backend.run(request);
        const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
        if (g.ranks.empty()) return 2;
        return write(fd, &s, sizeof s) == sizeof s ? 0 : 3;
      },
      &m.seconds, sizeof m.seconds);
  if (!child.ok) {
    std::fprintf(stderr, "bench_emulation: child failed (status %d)\n", child.status);
    std::exit(3);
  }
  m.peak_mib = child.peak_bytes / (1024.0 * 1024.0);
  return m;
}

const char* argText(int argc, char** argv, const char* name, const char* fallback) {
  for (int i = 1; i + 1 < argc; ++i)
    if (std::strcmp(argv[i], name) == 0) return argv[i + 1];
  return fallback;
}

int argInt(int argc, char** argv, const char* name, int fallback) {
  const char* text = argText(argc, argv, name, nullptr);
  return text != nullptr ? std::atoi(text) : fallback;
}

}  // namespace

int main(int argc, char** argv) {
  moe::Scenario sc;
  sc.name = "bench-emulation";
  sc.seed = 3;
  sc.mesh.dp = argInt(argc, argv, "--dp", 1024);
  sc.mesh.pp = argInt(argc, argv, "--pp", 2);
  sc.mesh.cp = argInt(argc, argv, "--cp", 2);
  sc.mesh.microbatches = argInt(argc, argv, "--mb", 1);
  sc.model.hidden = argInt(argc, argv, "--hidden", 128);
  sc.model.experts = argInt(argc, argv, "--experts", 16);
  sc.model.top_k = 2;
  sc.model.layers = sc.mesh.pp;  // one layer per stage
  sc.model.ffn = argInt(argc, argv, "--ffn", 128);
  sc.data.batch = sc.mesh.dp * sc.mesh.microbatches;
  sc.data.seq_len = argInt(argc, argv, "--seq", 256);
  sc.data.valid_lengths.assign(sc.data.batch, sc.data.seq_len);
  sc.aux.coeff = 0.01;
  moe::validateScenario(sc);

  moe::Scenario single = sc;
  single.mesh.dp = single.mesh.pp = single.mesh.cp = single.mesh.microbatches = 1;
  const int world = static_cast<int>(sc.mesh.world());
  // --only single|mesh measures one side (for profiling it alone); the default measures both.
  const std::string only = argText(argc, argv, "--only", "");
  std::printf("# scenario: batch %d x seq %d tokens, hidden %d, experts %d (top-2), ffn %d, %d layers\n",
              sc.data.batch, sc.data.seq_len, sc.model.hidden, sc.model.experts, sc.model.ffn,
              sc.model.layers);
  Measurement base, mesh;
  if (only != "mesh") {
    base = measureInChild(single);
    std::printf("single device (dp=pp=cp=1)      : %8.3f s  peak RSS %8.1f MiB\n", base.seconds, base.peak_mib);
  }
  if (only != "single") {
    mesh = measureInChild(sc);
    std::printf("emulated dp=%d pp=%d cp=%d M=%d (%d ranks): %8.3f s  peak RSS %8.1f MiB\n", sc.mesh.dp, sc.mesh.pp,
                sc.mesh.cp, sc.mesh.microbatches, world, mesh.seconds, mesh.peak_mib);
  }
  if (!only.empty()) return 0;
  // Issue 11, item 3: at 4096 ranks, <= 1.2x the single device's time and <= 1.1x its peak RSS.
  const double time_ratio = mesh.seconds / base.seconds, memory_ratio = mesh.peak_mib / base.peak_mib;
  std::printf("ratio emulated / single: time %.2fx (target <= 1.2x: %s), memory %.2fx (target <= 1.1x: %s)\n",
              time_ratio, time_ratio <= 1.2 ? "met" : "NOT met", memory_ratio, memory_ratio <= 1.1 ? "met" : "NOT met");
  return 0;
}
