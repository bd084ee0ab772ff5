// The start both bad-input suites share (tests/base/test_bad_inputs.cpp through the torch-free
// driver, tests/torch/test_bad_inputs_cli.cpp through moe-lbcheck): the row's input built in a fresh
// directory (a row that cannot apply here, e.g. an unreadable file under root, is skipped), the
// directory's listing before the tool runs, and where --report and stderr go.
#pragma once

#include <gtest/gtest.h>

#include <set>
#include <string>

#include "bad_input_table.hpp"
#include "torch/test_support.hpp"

namespace moe::badinput {

class BadInputTest : public ::testing::TestWithParam<BadInputCase> {
 protected:
  void SetUp() override {
    input_ = GetParam().build(dir_.path());
    if (!input_.skip_reason.empty()) GTEST_SKIP() << input_.skip_reason;
    before_ = listTree(dir_.path());
  }
  std::string reportPath() const { return (dir_ / "R.json").string(); }
  std::string stderrPath() const { return (dir_ / "stderr.txt").string(); }

  test::TempDir dir_;
  BuiltInput input_;
  std::set<std::string> before_;  // the directory's files after building the input
};

}  // namespace moe::badinput
