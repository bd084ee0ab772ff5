// The bad-input table (tests/bad_input_table.hpp) end to end through the torch-free driver
// moe-lbcheck-inputs, which runs the CLI's own parsing and validation: every row exits 2 (never a
// signal), names the file and the JSON path or tensor on stderr, and writes no --report. Torch-free,
// so scripts/sanitize.sh runs it under ASan + UBSan.
#include <gtest/gtest.h>

#include <filesystem>
#include <set>
#include <string>

#include "../bad_input_test.hpp"
#include "../torch/test_support.hpp"

#ifndef MOE_INPUTS_DRIVER_PATH
#error "MOE_INPUTS_DRIVER_PATH must name the moe-lbcheck-inputs binary"
#endif

namespace moe::badinput {
namespace {

class BadInputThroughDriver : public BadInputTest {};

TEST_P(BadInputThroughDriver, Exits2NamingTheFileAndPathAndWritesNothing) {
  const BadInputCase& row = GetParam();
  const BuiltInput& input = input_;
  const char* subcommand = row.kind == InputKind::kCapture ? "capture" : "scenario";
  const std::string report = reportPath();
  const std::string err_file = stderrPath();
  const test::ShellRun run = test::runShell(std::string(MOE_INPUTS_DRIVER_PATH) + " " + subcommand + " '" +
                                            input.path + "' --report '" + report + "' 2>'" + err_file + "'");
  const std::string err = test::readText(err_file);
  fs::remove(err_file);
  RecordProperty("message", err);  // in --gtest_output=xml, for reading every row's message
  EXPECT_EQ(run.exit_code, 2) << "stderr: " << err << "stdout: " << run.output;
  for (const std::string& expected : input.expected)
    EXPECT_TRUE(test::contains(err, expected)) << "message lacks \"" << expected << "\": " << err;
  EXPECT_TRUE(test::contains(err, "moe-lbcheck-inputs: error: ")) << err;
  EXPECT_FALSE(fs::exists(report)) << "a --report was written for bad input";
  EXPECT_EQ(listTree(dir_.path()), before_) << "the driver changed the directory";
}

INSTANTIATE_TEST_SUITE_P(Table, BadInputThroughDriver, ::testing::ValuesIn(badinput::badInputCases()),
                         [](const ::testing::TestParamInfo<BadInputCase>& info) { return std::string(info.param.name); });

// The table's own check: its valid bases are valid, so each row fails for its own edit.
TEST(BadInputTable, ValidBasesPassTheDriver) {
  test::TempDir dir("moe-bad-input");
  const fs::path scenario = badinput::writeScenarioWithData(dir.path());
  writeCapture((dir / "capture").string(), testjob::buildJob(testjob::JobShape{}));
  for (const std::string& args : {"scenario '" + scenario.string() + "'", "capture '" + (dir / "capture").string() + "'"}) {
    const test::ShellRun run = test::runShell(std::string(MOE_INPUTS_DRIVER_PATH) + " " + args + " 2>&1");
    EXPECT_EQ(run.exit_code, 0) << args << ": " << run.output;
  }
}

}  // namespace
}  // namespace moe::badinput
