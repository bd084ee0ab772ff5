// Reporters: the JSON output against schema/report.schema.json (a mini validator, so the schema and
// the writer cannot drift apart), NaN handling, JUnit well-formedness and escaping, the console
// footer, and the atomic file writer.
#include <gtest/gtest.h>

#include <unistd.h>

#include <cctype>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <map>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "common/errors.hpp"
#include "report/report.hpp"
#include "report/reporters.hpp"
#include "report_checkers.hpp"

namespace moe {
namespace {

using nlohmann::json;
namespace fs = std::filesystem;
using test::checkXml;
using test::firstAttributesOf;
using test::joined;
using test::schemaErrors;
using test::XmlCheck;

constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();
const std::string kNastyText = "a<b & c>d \"quoted\" 'single'";

// ---------------------------------------------------------------- fixtures

Scenario sampleScenario() {
  Scenario sc;
  sc.name = "automodel-1408";
  sc.source_file = "scenarios/automodel-1408.json";
  sc.framework.preset = Preset::kNemoAutomodel;
  sc.faults = {Fault::kDiscardApplyReturn};
  sc.aux.coeff = 0.01;
  sc.aux.group_weighting = GroupWeighting::kUniform;
  sc.mesh.dp = 2;
  sc.mesh.pp = 2;
  sc.mesh.microbatches = 2;
  return sc;
}

Report sampleReport() {
  Report report;
  report.context.kind = ReportKind::kRun;
  report.context.tool = {"0.1.0", "2.5.1", {"gloo", "cuda"}};
  report.context.scenario = sampleScenario();
  report.context.mesh = MeshSummary{report.context.scenario->mesh, "emulated", "1f1b"};
  report.summary.verdict = Verdict::kFail;
  report.summary.expectation_met = true;

  CheckResult passing;
  passing.name = "aux_grad/layer0/router_weight";
  passing.scale = 1.0;
  passing.cosine = 1.0;
  passing.max_abs_err = 1e-12;
  passing.max_rel_err = 1e-10;
  passing.rtol = 1e-7;
  passing.atol = 1e-13;
  passing.elements = 256;
  passing.method = "fd-logit-chain";

  CheckResult failing = passing;
  failing.name = "aux_grad/layer1/router_weight";
  failing.ok = false;
  failing.scale = 0.5;
  failing.cosine = kNaN;  // must become null / "-"
  failing.max_rel_err = 0.5;
  failing.wrong = 200;
  failing.diagnosis.code = DiagnosisCode::kAuxGradScaled;
  failing.diagnosis.factor = "1/dp";
  failing.diagnosis.factor_alternatives = {"1/pp"};
  failing.diagnosis.value = 0.5;
  failing.diagnosis.cause = "cause " + kNastyText;
  failing.diagnosis.fix = "fix " + kNastyText;

  CheckResult finding;
  finding.name = "objective/invariance";
  finding.kind = CheckKind::kObjectiveInvariance;
  finding.informational = true;
  finding.scale = std::numeric_limits<double>::infinity();  // must become null
  finding.diagnosis.code = DiagnosisCode::kObjectiveNotInvariant;
  finding.diagnosis.cause = "micro_batch scope depends on dp";

  report.checks = {passing, failing, finding};
  ReferenceSummary reference;
  reference.method = "fd-logit-chain";
  reference.max_step = 1e-6;
  reference.fd_error_estimate = 3e-11;
  reference.near_ties = 2;
  reference.empty_groups = 1;
  reference.aux_value = 0.0123;
  reference.main_value = 1.5;
  reference.seconds = 0.25;
  report.summary.reference = reference;
  report.summary.timing.reference_s = 0.25;
  report.summary.timing.mesh_s = 0.5;
  report.summary.timing.total_s = 0.8;
  return report;
}

Report passingReport() {
  Report report = sampleReport();
  report.checks.erase(report.checks.begin() + 1);
  report.summary.verdict = Verdict::kPass;
  return report;
}

Report emptyRunReport() {
  Report report;
  report.context.kind = ReportKind::kRun;
  return report;
}

std::string render(const Report& report, ReportFormat format, bool quiet = false) {
  return renderReport(report, format, ConsoleOptions{quiet});
}

json renderJson(const Report& report) { return json::parse(render(report, ReportFormat::kJson)); }

// ---------------------------------------------------------------- scratch directory

class ReportFile : public ::testing::Test {
 protected:
  void SetUp() override {
    const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
    dir_ = fs::temp_directory_path() /
           ("moe_report_test_" + std::to_string(::getpid()) + "_" + info->name());
    fs::remove_all(dir_);
    fs::create_directories(dir_);
  }
  void TearDown() override { fs::remove_all(dir_); }

  static std::string slurp(const fs::path& path) {
    std::ifstream in(path, std::ios::binary);
    std::stringstream buffer;
    buffer << in.rdbuf();
    return buffer.str();
  }
  std::vector<std::string> entries() const {
    std::vector<std::string> names;
    for (const auto& entry : fs::directory_iterator(dir_)) names.push_back(entry.path().filename().string());
    return names;
  }

  fs::path dir_;
};

// ================================================================ JSON

TEST(ReportJson, OutputSatisfiesTheSchema) {
  for (const Report& report : {sampleReport(), passingReport(), emptyRunReport()}) {
    const json j = renderJson(report);
    const std::vector<std::string> errors = schemaErrors(j);
    EXPECT_TRUE(errors.empty()) << joined(errors) << j.dump(2);
  }
}

TEST(ReportJson, ValidatorRejectsDrift) {
  // The mini validator must itself catch the mistakes it is there for.
  json j = renderJson(sampleReport());
  ASSERT_TRUE(schemaErrors(j).empty());

  json missing = j;
  missing["checks"][0].erase("cosine");
  EXPECT_NE(joined(schemaErrors(missing)).find("/checks/0: missing required \"cosine\""), std::string::npos);

  json bad_enum = j;
  bad_enum["checks"][1]["diagnosis"]["code"] = "AUX_GRAD_WEIRD";
  EXPECT_NE(joined(schemaErrors(bad_enum)).find("/checks/1/diagnosis/code"), std::string::npos);

  json bad_type = j;
  bad_type["mesh"]["dp"] = "two";
  EXPECT_NE(joined(schemaErrors(bad_type)).find("/mesh/dp: type string"), std::string::npos);

  json extra = j;
  extra["reference"]["surprise"] = 1;
  EXPECT_NE(joined(schemaErrors(extra)).find("\"surprise\" is not in the schema"), std::string::npos);

  json bad_verdict = j;
  bad_verdict["verdict"] = "maybe";
  EXPECT_FALSE(schemaErrors(bad_verdict).empty());
}

TEST(ReportJson, SchemaListsExactlyTheDiagnosisCodes) {
  for (const char* file : {"report.schema.json", "sweep.schema.json", "verify.schema.json"}) {
    const json schema = test::loadSchemaFile(file);
    const json& codes = schema["$defs"]["diagnosis"]["properties"]["code"]["enum"];
    const std::set<std::string> in_schema(codes.begin(), codes.end());
    const std::vector<std::string> names = diagnosisCodeNames();
    EXPECT_EQ(in_schema, std::set<std::string>(names.begin(), names.end())) << file;
  }
}

TEST(ReportJson, ContentAndKeys) {
  const json j = renderJson(sampleReport());
  EXPECT_EQ(j["schema_version"], 1);
  EXPECT_EQ(j["kind"], "run");
  EXPECT_EQ(j["tool"]["features"], json({"gloo", "cuda"}));
  EXPECT_EQ(j["scenario"]["name"], "automodel-1408");
  EXPECT_EQ(j["scenario_file"], "scenarios/automodel-1408.json");
  EXPECT_EQ(j["mesh"]["microbatches"], 2);
  EXPECT_EQ(j["mesh"]["world"], 4);
  EXPECT_EQ(j["verdict"], "fail");
  EXPECT_EQ(j["expectation_met"], true);
  ASSERT_EQ(j["checks"].size(), 3u);
  EXPECT_TRUE(j["checks"][0]["diagnosis"].is_null());
  EXPECT_EQ(j["checks"][1]["diagnosis"]["code"], "AUX_GRAD_SCALED");
  EXPECT_EQ(j["checks"][1]["diagnosis"]["factor"], "1/dp");
  EXPECT_EQ(j["checks"][1]["diagnosis"]["factor_alternatives"], json({"1/pp"}));
  // The echoed scenario holds typed values by their JSON names.
  EXPECT_EQ(j["scenario"]["framework"]["preset"], "nemo_automodel");
  EXPECT_EQ(j["scenario"]["faults"], json({"discard_apply_return"}));
  EXPECT_EQ(j["scenario"]["aux"]["group_weighting"], "uniform");
  EXPECT_EQ(j["checks"][1]["diagnosis"]["cause"], "cause " + kNastyText);
  EXPECT_EQ(j["checks"][1]["wrong"], 200);
  EXPECT_EQ(j["checks"][2]["informational"], true);
  EXPECT_EQ(j["reference"]["near_ties"], 2);
  EXPECT_DOUBLE_EQ(j["reference"]["fd_error_estimate"].get<double>(), 3e-11);
  EXPECT_DOUBLE_EQ(j["timing"]["total_s"].get<double>(), 0.8);
  // Full double precision survives.
  EXPECT_EQ(j["checks"][0]["max_rel_err"].get<double>(), 1e-10);
}

TEST(ReportJson, NonFiniteNumbersBecomeNull) {
  const std::string text = render(sampleReport(), ReportFormat::kJson);
  for (const char* literal : {": NaN", ": nan", ": -nan", ": inf", ": -inf", "Infinity"}) {
    EXPECT_EQ(text.find(literal), std::string::npos) << literal;
  }
  const json j = json::parse(text);
  EXPECT_TRUE(j["checks"][1]["cosine"].is_null());
  EXPECT_TRUE(j["checks"][2]["scale"].is_null());
  EXPECT_TRUE(j["checks"][2]["diagnosis"]["value"].is_null());
  EXPECT_DOUBLE_EQ(j["checks"][1]["scale"].get<double>(), 0.5);
}

TEST(ReportJson, VerdictIsTheSummarys) {
  Report report = sampleReport();
  EXPECT_EQ(renderJson(report)["verdict"], "fail");
  report.summary.verdict = Verdict::kPass;
  EXPECT_EQ(renderJson(report)["verdict"], "pass");
}

TEST(ReportVerdict, InformationalRowsDoNotDecide) {
  Report report = sampleReport();
  EXPECT_EQ(verdictOf(report.checks), Verdict::kFail);
  report.checks[1].ok = true;
  EXPECT_EQ(verdictOf(report.checks), Verdict::kPass);
  report.checks[2].ok = false;  // informational: does not change the verdict
  EXPECT_EQ(verdictOf(report.checks), Verdict::kPass);
}

// ================================================================ JUnit

TEST(ReportJUnit, WellFormedWithCountsAndEscaping) {
  Report report = sampleReport();
  report.summary.expectation_met = false;  // a real failure: the failing check is a <failure>
  report.checks[0].name = "name with <angle> & \"quotes\"";
  const std::string xml_text = render(report, ReportFormat::kJUnit);
  const XmlCheck xml = checkXml(xml_text);
  ASSERT_TRUE(xml.ok) << xml.error << "\n" << xml_text;

  EXPECT_EQ(xml.element_counts.at("testsuites"), 1);
  EXPECT_EQ(xml.element_counts.at("testsuite"), 1);
  EXPECT_EQ(xml.element_counts.at("testcase"), 3);
  EXPECT_EQ(xml.element_counts.at("failure"), 1);
  EXPECT_EQ(xml.element_counts.at("system-out"), 1);

  const auto& suite = firstAttributesOf(xml, "testsuite");
  EXPECT_EQ(suite.at("name"), "automodel-1408");
  EXPECT_EQ(suite.at("tests"), "3");
  EXPECT_EQ(suite.at("failures"), "1");
  EXPECT_EQ(firstAttributesOf(xml, "testsuites").at("failures"), "1");

  const auto& first_case = firstAttributesOf(xml, "testcase");
  EXPECT_EQ(first_case.at("name"), "name with <angle> & \"quotes\"");
  EXPECT_EQ(first_case.at("classname"), "moe-lbcheck.automodel-1408");

  const auto& failure = firstAttributesOf(xml, "failure");
  EXPECT_NE(failure.at("message").find("scale=0.5"), std::string::npos);
  EXPECT_NE(failure.at("message").find("cosine=-"), std::string::npos);
  EXPECT_NE(failure.at("message").find("AUX_GRAD_SCALED factor=1/dp"), std::string::npos);
  EXPECT_NE(failure.at("message").find("cause " + kNastyText), std::string::npos);
  EXPECT_EQ(failure.at("type"), "AUX_GRAD_SCALED");
  // The diagnosis text round-trips through the element content too.
  EXPECT_NE(xml.text.find("fix: fix " + kNastyText), std::string::npos);
  EXPECT_NE(xml.text.find("OBJECTIVE_NOT_INVARIANT"), std::string::npos);
}

TEST(ReportJUnit, ExpectedFailuresAreSkippedNotFailed) {
  // A bug-reproducing scenario whose checks fail as expected exits 0: JUnit must not be red.
  const Report report = sampleReport();  // verdict fail, expectation met
  const XmlCheck xml = checkXml(render(report, ReportFormat::kJUnit));
  ASSERT_TRUE(xml.ok) << xml.error;
  EXPECT_EQ(xml.element_counts.count("failure"), 0u);
  EXPECT_EQ(xml.element_counts.at("skipped"), 1);
  EXPECT_EQ(firstAttributesOf(xml, "testsuite").at("failures"), "0");
  EXPECT_EQ(firstAttributesOf(xml, "testsuite").at("skipped"), "1");
  EXPECT_NE(firstAttributesOf(xml, "skipped").at("message").find("expected failure"), std::string::npos);
}

TEST(ReportJUnit, ControlCharactersAndEmptyReport) {
  Report report = sampleReport();
  report.checks[1].diagnosis.cause = std::string("bell\x07 and nul-free \x1b escape");
  const XmlCheck xml = checkXml(render(report, ReportFormat::kJUnit));
  ASSERT_TRUE(xml.ok) << xml.error;
  EXPECT_EQ(xml.text.find('\x07'), std::string::npos);

  const XmlCheck empty = checkXml(render(emptyRunReport(), ReportFormat::kJUnit));
  ASSERT_TRUE(empty.ok) << empty.error;
  EXPECT_EQ(empty.element_counts.count("testcase"), 0u);
  EXPECT_EQ(firstAttributesOf(empty, "testsuite").at("name"), "unnamed");
}

TEST(ReportJUnit, PassingReportHasNoFailures) {
  const XmlCheck xml = checkXml(render(passingReport(), ReportFormat::kJUnit));
  ASSERT_TRUE(xml.ok) << xml.error;
  EXPECT_EQ(xml.element_counts.count("failure"), 0u);
  EXPECT_EQ(firstAttributesOf(xml, "testsuite").at("failures"), "0");
  EXPECT_EQ(firstAttributesOf(xml, "testsuite").at("tests"), "2");
}

// ================================================================ console

// Every one of `present` occurs in text, none of `absent`.
void expectText(const std::string& text, const std::vector<std::string>& present,
                const std::vector<std::string>& absent = {}) {
  for (const std::string& p : present) EXPECT_NE(text.find(p), std::string::npos) << "missing: " << p << "\n" << text;
  for (const std::string& a : absent) EXPECT_EQ(text.find(a), std::string::npos) << "present: " << a << "\n" << text;
}

TEST(ReportConsole, FooterSaysFailedAndListsDiagnosis) {
  const std::string text = render(sampleReport(), ReportFormat::kConsole);
  expectText(
      text,
      {"# moe-lbcheck: FAILED (1 of 2 checks failed, 1 informational)", "# expectation: met",
       "-> AUX_GRAD_SCALED factor=1/dp", "; fix: fix " + kNastyText, "dp=2 pp=2 cp=1 M=2 world=4 backend=emulated",
       "# preset: nemo_automodel", "automodel-1408", "near-ties=2", "200/256", "INFO"},
      {"nan"});  // NaN prints as "-"
  // The footer is the last two lines.
  const std::string tail = text.substr(text.rfind("# moe-lbcheck:"));
  EXPECT_EQ(tail, "# moe-lbcheck: FAILED (1 of 2 checks failed, 1 informational)\n# expectation: met\n");
}

TEST(ReportConsole, FooterSaysOk) {
  Report report = passingReport();
  const std::string text = render(report, ReportFormat::kConsole);
  EXPECT_NE(text.find("# moe-lbcheck: OK (1 checks, 0 failed, 1 informational)"), std::string::npos) << text;
  EXPECT_EQ(text.find("FAILED"), std::string::npos);

  report.summary.expectation_met = false;
  report.summary.expectation_detail = "expected verdict fail with AUX_GRAD_MISSING, got pass";
  const std::string unmet = render(report, ReportFormat::kConsole);
  EXPECT_NE(unmet.find("# expectation: not met (expected verdict fail with AUX_GRAD_MISSING, got pass)"),
            std::string::npos);
}

TEST(ReportConsole, TableColumnsLineUp) {
  const std::string text = render(sampleReport(), ReportFormat::kConsole);
  std::istringstream lines(text);
  std::string line;
  std::vector<std::size_t> result_columns;
  while (std::getline(lines, line)) {
    for (const char* word : {" OK", " FAILED", " INFO", " result"}) {
      if (line.size() >= std::strlen(word) && line.compare(line.size() - std::strlen(word), std::string::npos, word) == 0) {
        result_columns.push_back(line.size() - std::strlen(word));
      }
    }
  }
  ASSERT_EQ(result_columns.size(), 4u) << text;  // header + 3 rows
  for (std::size_t column : result_columns) EXPECT_EQ(column, result_columns.front()) << text;
}

TEST(ReportConsole, QuietPrintsOnlyFailuresAndFooter) {
  const std::string text = render(sampleReport(), ReportFormat::kConsole, true);
  expectText(text, {"aux_grad/layer1/router_weight", "-> AUX_GRAD_SCALED", "# moe-lbcheck: FAILED"},
             {"aux_grad/layer0/router_weight", "objective/invariance", "# reference:"});

  const std::string quiet_pass = render(passingReport(), ReportFormat::kConsole, true);
  EXPECT_EQ(quiet_pass,
            "# moe-lbcheck: OK (1 checks, 0 failed, 1 informational)\n# expectation: met\n");
}

// ================================================================ files

TEST_F(ReportFile, AtomicWriteReplacesAndLeavesNoTemp) {
  const fs::path target = dir_ / "report.json";
  writeFileAtomically(target.string(), "old content that is longer");
  EXPECT_EQ(slurp(target), "old content that is longer");
  writeFileAtomically(target.string(), "new");
  EXPECT_EQ(slurp(target), "new");
  writeFileAtomically(target.string(), "");
  EXPECT_EQ(slurp(target), "");
  EXPECT_EQ(entries(), std::vector<std::string>{"report.json"});
}

TEST_F(ReportFile, RenderedReportWrittenToFile) {
  const fs::path target = dir_ / "r.xml";
  writeFileAtomically(target.string(), render(sampleReport(), ReportFormat::kJUnit));
  EXPECT_TRUE(checkXml(slurp(target)).ok);
}

TEST_F(ReportFile, MissingDirectoryThrowsRuntimeFailureNamingThePath) {
  const std::string target = (dir_ / "no" / "such" / "dir" / "report.json").string();
  try {
    writeFileAtomically(target, "x");
    FAIL() << "no exception";
  } catch (const RuntimeFailure& e) {
    EXPECT_NE(std::string(e.what()).find(target), std::string::npos) << e.what();
    EXPECT_EQ(e.code(), ExitCode::kRuntimeFailure);
  }
  EXPECT_TRUE(entries().empty());
}

TEST_F(ReportFile, TargetThatIsADirectoryThrowsAndCleansUp) {
  fs::create_directories(dir_ / "occupied");
  fs::create_directories(dir_ / "occupied" / "child");  // a non-empty directory cannot be replaced
  EXPECT_THROW(writeFileAtomically((dir_ / "occupied").string(), "x"), RuntimeFailure);
  EXPECT_EQ(entries(), std::vector<std::string>{"occupied"});
}

}  // namespace
}  // namespace moe
