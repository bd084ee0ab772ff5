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

// The binary's exit code and stderr.
test::ShellRun runCli(const std::string& args) { return test::runCli(args, test::CliStream::kStderr); }

const std::string kQuickstart = std::string(MOE_SCENARIOS_DIR) + "/quickstart.json";

TEST(Nccl, WithoutAGpuTheBackendFailsWithAClearMessage) {
  const std::string why = cudaUnavailableReason();
  if (why.empty()) GTEST_SKIP() << "a CUDA device is present: the no-GPU failure path does not apply";
  const test::ShellRun r = runCli("run " + kQuickstart + " --backend nccl");
  EXPECT_EQ(r.exit_code, 3) << r.output;
  EXPECT_NE(r.output.find("nccl"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("cudaGetDeviceCount"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("--backend gloo"), std::string::npos) << r.output;  // says what to do instead
}

TEST(Nccl, TwoRanksAgreeWithTheEmulatedMesh) {
  const std::string why = cudaUnavailableReason();
  if (!why.empty()) GTEST_SKIP() << "no usable GPU (" << why << "): NCCL agreement not tested here";
  // One GPU per rank: needs two devices.
  const test::ShellRun r = runCli("run " + kQuickstart + " --mesh dp=2 --backend nccl --nproc 2 -q");
  EXPECT_EQ(r.exit_code, 0) << r.output;
}

}  // namespace
}  // namespace moe
