// The bad-input table (tests/bad_input_table.hpp) through the real moe-lbcheck: scenario rows with
// `validate` and `run`, data rows with `run`, capture rows with `verify`. Every row exits 2 (never a
// signal), names the file and the JSON path or tensor, and writes no --report; the same rows run
// through the torch-free driver in tests/base/test_bad_inputs.cpp, under the sanitizers too.
#include <gtest/gtest.h>

#include <filesystem>
#include <set>
#include <string>
#include <vector>

#include "../bad_input_test.hpp"
#include "test_support.hpp"

#ifndef MOE_CLI_PATH
#error "MOE_CLI_PATH must name the moe-lbcheck binary"
#endif

namespace moe::badinput {
namespace {

// The subcommands a row's input goes through.
std::vector<std::string> subcommandsFor(InputKind kind) {
  switch (kind) {
    case InputKind::kScenario: return {"validate", "run"};
    case InputKind::kData: return {"run"};
    case InputKind::kCapture: return {"verify"};
  }
  return {};
}

class BadInputThroughCli : public BadInputTest {};

TEST_P(BadInputThroughCli, Exits2NamingTheFileAndPathAndWritesNothing) {
  const BadInputCase& row = GetParam();
  const BuiltInput& input = input_;
  const std::string report = reportPath();
  const std::string err_file = stderrPath();
  for (const std::string& subcommand : subcommandsFor(row.kind)) {
    std::string command = std::string(MOE_CLI_PATH) + " " + subcommand + " '" + input.path + "'";
    if (subcommand != "validate") command += " --report '" + report + "'";
    // validate prints its verdicts on stdout ("INVALID <message>"); the others print errors on stderr.
    const test::ShellRun run = test::runShell(command + " 2>'" + err_file + "'");
    const std::string message = run.output + test::readText(err_file);
    fs::remove(err_file);
    EXPECT_EQ(run.exit_code, 2) << subcommand << ": " << message;
    for (const std::string& expected : input.expected)
      EXPECT_TRUE(test::contains(message, expected)) << subcommand << ": message lacks \"" << expected
                                                    << "\": " << message;
    EXPECT_FALSE(fs::exists(report)) << subcommand << " wrote a --report for bad input";
    EXPECT_EQ(listTree(dir_.path()), before_) << subcommand << " changed the directory";
  }
}

INSTANTIATE_TEST_SUITE_P(Table, BadInputThroughCli, ::testing::ValuesIn(badinput::badInputCases()),
                         [](const ::testing::TestParamInfo<BadInputCase>& info) { return std::string(info.param.name); });

}  // namespace
}  // namespace moe::badinput
