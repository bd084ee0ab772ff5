// The NCCL backend: built where CUDA and nccl.h are found, it must fail clearly without a GPU and
// its GPU tests must skip visibly (CI machines have no GPU).
#include <gtest/gtest.h>

#include <sys/wait.h>

#include <cstdio>
#include <string>

#include "cuda/nccl_communicator.hpp"
#include "test_support.hpp"

namespace moe {
namespace {

struct CliRun {
  int exit_code;
  std::string err;
};

// The binary's exit code and stderr (stdout discarded).
CliRun runCli(const std::string& args) {
  const test::ShellRun r = test::runShell(std::string(MOE_CLI_PATH) + " " + args + " 2>&1 >/dev/null");
  return {r.exit_code, r.output};
}

const std::string kQuickstart = std::string(MOE_SCENARIOS_DIR) + "/quickstart.json";

TEST(Nccl, WithoutAGpuTheBackendFailsWithAClearMessage) {
  const std::string why = cudaUnavailableReason();
  if (why.empty()) GTEST_SKIP() << "a CUDA device is present: the no-GPU failure path does not apply";
  const CliRun r = runCli("run " + kQuickstart + " --backend nccl");
  EXPECT_EQ(r.exit_code, 3) << r.err;
  EXPECT_NE(r.err.find("nccl"), std::string::npos) << r.err;
  EXPECT_NE(r.err.find("cudaGetDeviceCount"), std::string::npos) << r.err;
  EXPECT_NE(r.err.find("--backend gloo"), std::string::npos) << r.err;  // says what to do instead
}

TEST(Nccl, TwoRanksAgreeWithTheEmulatedMesh) {
  const std::string why = cudaUnavailableReason();
  if (!why.empty()) GTEST_SKIP() << "no usable GPU (" << why << "): NCCL agreement not tested here";
  // One GPU per rank: needs two devices.
  const CliRun r = runCli("run " + kQuickstart + " --mesh dp=2 --backend nccl --nproc 2 -q");
  EXPECT_EQ(r.exit_code, 0) << r.err;
}

}  // namespace
}  // namespace moe
