// sweep and selftest end to end: the library entry points and the binary's exit codes.
#include <gtest/gtest.h>

#include <sys/wait.h>

#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "app/selftest.hpp"
#include "test_support.hpp"
#include "app/sweep.hpp"
#include "scenario/catalog.hpp"
#include "sim/emulated_backend.hpp"
#include "../base/report_checkers.hpp"

namespace moe {
namespace {

// The binary's exit code and stdout.
test::ShellRun runCli(const std::string& args) { return test::runCli(args, test::CliStream::kStdout); }

std::string scenarioPath(const std::string& name) { return std::string(MOE_SCENARIOS_DIR) + "/" + name; }

TEST(Sweep, EveryLayoutOfWorldFourPassesForTheQuickstart) {
  Scenario sc = loadScenarioFile(scenarioPath("quickstart.json"));
  SweepOptions options;
  options.world = 4;
  int calls = 0;
  std::ostringstream json_text;
  JsonReporter json_reporter(json_text);
  EmulatedBackend backend;
  const Report r = runSweep(sc, options, backend, {&json_reporter}, [&](int, int, const MeshConfig&) { ++calls; });
  // batch 4, seq_len 16, 2 layers, megatron (SP with TP): tp 1: (dp,pp,cp) in {(1,1,4),(1,2,2),(2,1,2),
  // (2,2,1),(4,1,1)} with M | 4/dp: 3 + 3 + 2 + 2 + 1 = 11 layouts ((1,4,1) and pp=4 are not allowed by
  // 2 layers); tp 2: (1,1,2), (1,2,1), (2,1,1): 3 + 3 + 2 = 8; tp 4: (1,1,1): 3. 22 in all.
  EXPECT_EQ(r.checks.size(), 22u);
  EXPECT_EQ(calls, 22);
  EXPECT_EQ(r.summary.verdict, Verdict::kPass);
  for (const CheckResult& row : r.checks) EXPECT_EQ(row.layout->sizes.world(), 4);
  const auto json = nlohmann::json::parse(json_text.str());
  EXPECT_EQ(json["schema_version"], 1);
  EXPECT_EQ(json["kind"], "sweep");
  EXPECT_EQ(json["rows"].size(), 22u);
  EXPECT_EQ(json["verdict"], "pass");
  const std::vector<std::string> errors = test::schemaErrors(json, "sweep.schema.json");
  EXPECT_TRUE(errors.empty()) << test::joined(errors);
}

TEST(Sweep, BinaryExitsOneWhenALayoutFailsAndNamesTheFactor) {
  const test::ShellRun r =
      runCli("sweep " + scenarioPath("missing_cp_scale.json") + " --world 6 --fixed-microbatches -q");
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_NE(r.output.find("dp=3 pp=1 cp=2 M=5"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("factor=1/cp"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("FAILED ("), std::string::npos) << r.output;
}

TEST(Sweep, NoValidLayoutIsAnInputError) {
  const test::ShellRun r = runCli("sweep " + scenarioPath("quickstart.json") + " --world 7 -q");
  EXPECT_EQ(r.exit_code, 2);
}

TEST(Selftest, CoversEveryCatalogFaultOnceWithDistinctMeshQuantities) {
  const auto cases = selftestCases();
  ASSERT_EQ(cases.size(), faultCatalog().size());
  for (size_t i = 0; i < cases.size(); ++i) {
    EXPECT_EQ(cases[i].fault, faultCatalog()[i].id);
    EXPECT_EQ(cases[i].buggy.faults, std::vector<Fault>{cases[i].fault});
    EXPECT_TRUE(cases[i].fixed.faults.empty());
    EXPECT_EQ(cases[i].buggy.expect.diagnosis, faultCatalog()[i].expected_diagnosis);
  }
}

// One selftest run of the binary (it runs every fault twice): its console footer and its JSON report.
TEST(Selftest, BinaryFlagsEveryFaultAndItsJsonReportSatisfiesItsSchema) {
  char dir_template[] = "/tmp/moe-selftest-json-XXXXXX";
  const std::string dir = mkdtemp(dir_template);
  const std::string path = dir + "/selftest.json";
  const test::ShellRun r = runCli("selftest -q --report " + path);
  EXPECT_EQ(r.exit_code, 0) << r.output;
  EXPECT_NE(r.output.find("selftest: OK (" + std::to_string(faultCatalog().size()) + " faults flagged"),
            std::string::npos)
      << r.output;
  EXPECT_EQ(r.output.find("MISSED"), std::string::npos) << r.output;
  std::ifstream in(path);
  const nlohmann::json j = nlohmann::json::parse(in);
  EXPECT_EQ(j["kind"], "selftest");
  EXPECT_EQ(j["rows"].size(), faultCatalog().size());
  const std::vector<std::string> errors = test::schemaErrors(j, "selftest.schema.json");
  EXPECT_TRUE(errors.empty()) << test::joined(errors);
  for (const auto& row : j["rows"]) {
    EXPECT_EQ(row["flagged"], true) << row.dump();
    EXPECT_EQ(row["measured"]["code"], row["expected"]["code"]) << row.dump();
  }
  std::remove(path.c_str());
  std::remove(dir.c_str());
}

TEST(Selftest, ExportedScenariosMatchTheShippedOnes) {
  char dir_template[] = "/tmp/moe-selftest-XXXXXX";
  const std::string dir = mkdtemp(dir_template);
  ASSERT_EQ(runCli("selftest --export " + dir).exit_code, 0);
  for (const SelftestCase& c : selftestCases())
    for (const std::string& name : {c.buggy.name, c.fixed.name}) {
      std::ifstream exported(dir + "/" + name + ".json"), shipped(scenarioPath(name + ".json"));
      std::stringstream a, b;
      a << exported.rdbuf();
      b << shipped.rdbuf();
      EXPECT_EQ(a.str(), b.str()) << name << ": scenarios/ is out of date; run selftest --export scenarios";
      std::remove((dir + "/" + name + ".json").c_str());
    }
  std::remove(dir.c_str());
}

}  // namespace
}  // namespace moe
