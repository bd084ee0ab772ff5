// The memory estimate that guards the 8 GiB bound (estimateMemoryBytes, scenario validation) against
// the measured peak RSS of the run it estimates (issue 10, item 6): each scenario runs in a forked
// child through the same library call as `moe-lbcheck run` (runChecks, emulated backend); the peak is
// the child's ru_maxrss from wait4. Target: the estimate within 25% of the peak.
//
//   bench_memory [SCENARIO.json ...]   (default: bench/scenarios/{dsv3-size,wide-tp,medium-2048}.json)
#include <cmath>
#include <cstdio>
#include <string>
#include <vector>

#include "app/check_run.hpp"
#include "child_process.hpp"
#include "scenario/scenario.hpp"
#include "sim/emulated_backend.hpp"

namespace {

// Peak RSS in bytes of one run of `sc` in a child process; negative when the run failed.
double measuredPeak(const moe::Scenario& sc) {
  const moe::bench::ChildOutcome child = moe::bench::runInChild(
      [&](int) {
        try {
          moe::EmulatedBackend backend;
          (void)moe::runChecks(sc, backend);
        } catch (const std::exception& e) {
          std::fprintf(stderr, "bench_memory: %s: %s\n", sc.name.c_str(), e.what());
          return 3;
        }
        return 0;
      },
      nullptr, 0);
  return child.ok ? child.peak_bytes : -1;
}

}  // namespace

int main(int argc, char** argv) {
  std::vector<std::string> files;
  for (int i = 1; i < argc; ++i) files.emplace_back(argv[i]);
  if (files.empty())
    for (const char* name : {"dsv3-size", "wide-tp", "medium-2048"})
      files.push_back(std::string(MOE_BENCH_DIR) + "/scenarios/" + name + ".json");
  std::printf("%-22s %12s %12s %9s  %s\n", "scenario", "estimate GB", "peak GB", "est/peak", "within 25%");
  int failures = 0;
  for (const std::string& file : files) {
    const moe::Scenario sc = moe::loadScenarioFile(file);
    const double estimate = static_cast<double>(moe::estimateMemoryBytes(sc));
    const double peak = measuredPeak(sc);
    if (peak < 0) {
      std::printf("%-22s run failed\n", sc.name.c_str());
      ++failures;
      continue;
    }
    const double ratio = estimate / peak;
    const bool ok = std::abs(ratio - 1.0) <= 0.25;
    if (!ok) ++failures;
    std::printf("%-22s %12.3f %12.3f %9.2f  %s\n", sc.name.c_str(), estimate / 1e9, peak / 1e9, ratio,
                ok ? "yes" : "NO");
  }
  return failures == 0 ? 0 : 1;
}
