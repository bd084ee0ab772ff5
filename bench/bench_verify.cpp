// What `verify` costs beyond its reference, on a capture of DeepSeek-V3's router size (issue 8, item
// 6): H 7168, E 256, top-8, 4 DP ranks x 4096 tokens, F32 router inputs, one layer. Targets: total
// time / the reference's own time <= 1.3 (reading, checking and assembling the capture cost at most 30%
// on top) and peak RSS <= 1.5 x the capture's size on disk (the inputs are memory-mapped and converted
// to float64 in row blocks, never copied whole).
//
// The capture is written first (in this process); verify then runs in a forked child, so that its peak
// RSS (wait4's ru_maxrss) is its own and not the writer's.
//
//   bench_verify [--dir DIR] [--ranks 4] [--tokens 4096] [--hidden 7168] [--experts 256] [--top-k 8]
//                [--keep]
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <random>
#include <string>
#include <vector>

#include "capture/capture_writer.hpp"
#include "child_process.hpp"
#include "verify/verify.hpp"

namespace {

using namespace moe;  // a benchmark program: the library's names, unqualified
namespace fs = std::filesystem;

struct Options {
  std::string dir;
  int ranks = 4, tokens = 4096, hidden = 7168, experts = 256, top_k = 8;
  bool keep = false;
};

Options parse(int argc, char** argv) {
  Options o;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    const auto next = [&]() -> const char* {
      if (i + 1 >= argc) {
        std::fprintf(stderr, "bench_verify: %s needs a value\n", a.c_str());
        std::exit(2);
      }
      return argv[++i];
    };
    if (a == "--dir") o.dir = next();
    else if (a == "--ranks") o.ranks = std::atoi(next());
    else if (a == "--tokens") o.tokens = std::atoi(next());
    else if (a == "--hidden") o.hidden = std::atoi(next());
    else if (a == "--experts") o.experts = std::atoi(next());
    else if (a == "--top-k") o.top_k = std::atoi(next());
    else if (a == "--keep") o.keep = true;
    else {
      std::fprintf(stderr, "bench_verify: unknown option %s\n", a.c_str());
      std::exit(2);
    }
  }
  if (o.ranks < 1 || o.tokens < 1 || o.hidden < 1 || o.experts < 1 || o.top_k < 1 || o.top_k > o.experts) {
    std::fprintf(stderr, "bench_verify: sizes must be >= 1 and top-k <= experts\n");
    std::exit(2);
  }
  return o;
}

// DP rank d holds sequence d (seq_len = tokens), one microbatch; every rank holds the same weight and a
// gradient of the size a real one has (its values do not change the cost).
void writeBenchCapture(const Options& o, const std::string& dir) {
  std::mt19937_64 rng(20241201);
  std::normal_distribution<double> normal(0.0, 1.0);
  std::vector<double> weight(static_cast<size_t>(o.experts) * o.hidden);
  for (double& w : weight) w = normal(rng) * 0.02;
  for (int r = 0; r < o.ranks; ++r) {
    CaptureRankRecord rank;
    CaptureManifest& m = rank.manifest;
    m.rank = r;
    m.world_size = o.ranks;
    m.mesh.dp = r;
    m.mesh.dp_size = o.ranks;
    m.layers = {0};
    m.seq_len = o.tokens;
    m.objective.aux_scope = AuxScope::kSequence;
    m.objective.aux_coeff = 1e-4;
    m.objective.top_k = o.top_k;
    m.objective.score = ScoreFunction::kSigmoid;  // DeepSeek-V3's router
    m.framework = "bench_verify";
    m.created_by = "bench/bench_verify.cpp";
    rank.weight_dtype = rank.grad_dtype = rank.input_dtype = CaptureFloat::kF32;
    CaptureLayerRecord layer;
    layer.layer = 0;
    layer.experts = o.experts;
    layer.hidden = o.hidden;
    layer.weight = weight;
    layer.grad.resize(weight.size());
    for (double& g : layer.grad) g = normal(rng) * 1e-6;
    CaptureMicrobatchRecord mb;
    mb.input.resize(static_cast<size_t>(o.tokens) * o.hidden);
    for (double& x : mb.input) x = normal(rng);
    for (int t = 0; t < o.tokens; ++t) {
      mb.sequence.push_back(r);
      mb.position.push_back(t);
      mb.valid.push_back(1);
    }
    layer.microbatches.push_back(std::move(mb));
    rank.layers.push_back(std::move(layer));
    writeCaptureRank(dir + "/rank" + std::to_string(r) + ".safetensors", rank);
  }
}

struct VerifyMeasurement {
  double total_s = 0, reference_s = 0, load_s = 0, wall_s = 0;
  double peak_mib = 0;
};

VerifyMeasurement verifyInChild(const std::string& dir) {
  double v[4] = {-1, -1, -1, -1};
  const moe::bench::ChildOutcome child = moe::bench::runInChild(
      [&](int fd) {
        // A fresh image (exec), so that no page of the writer's heap counts in the child's RSS.
        const std::string fd_text = std::to_string(fd);
        execl("/proc/self/exe", "bench_verify", "--verify-only", dir.c_str(), fd_text.c_str(),
              static_cast<char*>(nullptr));
        return 4;
      },
      v, sizeof v);
  if (!child.ok) {
    std::fprintf(stderr, "bench_verify: the verify child failed (status %d)\n", child.status);
    std::exit(3);
  }
  return {v[0], v[1], v[2], v[3], child.peak_bytes / (1024.0 * 1024.0)};
}

// The child: verify DIR, write (total, reference, load, wall) seconds to the pipe FD.
int verifyOnly(const std::string& dir, int fd) {
  const auto t0 = std::chrono::steady_clock::now();
  const Report r = verifyCaptureDirectory(dir, VerifyOptions{}, ToolInfo{"bench", "", {}});
  double v[4] = {r.summary.timing.total_s, r.summary.timing.reference_s, r.summary.timing.load_s,
                 std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count()};
  return write(fd, v, sizeof v) == sizeof v ? 0 : 3;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc == 4 && std::string(argv[1]) == "--verify-only") return verifyOnly(argv[2], std::atoi(argv[3]));
  const Options o = parse(argc, argv);
  std::string dir = o.dir;
  if (dir.empty()) {
    char t[] = "/tmp/moe-bench-verify-XXXXXX";
    if (!mkdtemp(t)) return 3;
    dir = t;
  } else {
    fs::create_directories(dir);
  }
  const auto t0 = std::chrono::steady_clock::now();
  writeBenchCapture(o, dir);
  const double write_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::uintmax_t bytes = 0;
  for (const auto& e : fs::directory_iterator(dir)) bytes += e.file_size();
  const double disk_mib = bytes / (1024.0 * 1024.0);

  const VerifyMeasurement m = verifyInChild(dir);
  std::printf("bench_verify: %d ranks x %d tokens, H %d, E %d, top-%d, F32 inputs, one layer\n", o.ranks,
              o.tokens, o.hidden, o.experts, o.top_k);
  std::printf("  capture on disk   %10.1f MiB   (written in %.1f s)\n", disk_mib, write_s);
  std::printf("  verify total_s    %10.3f s     (timing.total_s; wall in the child %.3f s)\n", m.total_s, m.wall_s);
  std::printf("  verify load_s     %10.3f s     (mapping and checking the rank files, assembling tokens)\n",
              m.load_s);
  std::printf("  verify reference_s%10.3f s\n", m.reference_s);
  std::printf("  peak RSS          %10.1f MiB\n", m.peak_mib);
  const double time_ratio = m.total_s / m.reference_s, rss_ratio = m.peak_mib / disk_mib;
  std::printf("  total / reference %10.3f      (target <= 1.3)  %s\n", time_ratio, time_ratio <= 1.3 ? "MET" : "NOT MET");
  std::printf("  peak RSS / disk   %10.3f      (target <= 1.5)  %s\n", rss_ratio, rss_ratio <= 1.5 ? "MET" : "NOT MET");
  if (!o.keep) fs::remove_all(dir);
  return 0;
}
