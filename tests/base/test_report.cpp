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

namespace moe {
namespace {

using nlohmann::json;
namespace fs = std::filesystem;

constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();
const std::string kNastyText = "a<b & c>d \"quoted\" 'single'";

// ---------------------------------------------------------------- fixtures

Report sampleReport() {
  Report report;
  report.tool = {"0.1.0", "2.5.1", {"gloo", "cuda"}};
  report.scenario_json =
      R"({"schema_version": 1, "name": "automodel-1408", "framework": {"preset": "nemo_automodel"},
          "faults": ["discard_apply_return"], "aux": {"type": "micro_batch", "coeff": 0.01,
          "z_loss_coeff": 0.0}, "model": {"dtype": "float64"}})";
  report.scenario_file = "scenarios/automodel-1408.json";
  report.mesh = {2, 2, 1, 2, 4, "emulated", "1f1b"};
  report.verdict = "fail";
  report.expectation_met = true;

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
  failing.diagnosis = {diag::kAuxGradScaled, "1/dp", 0.5, "cause " + kNastyText, "fix " + kNastyText};

  CheckResult finding;
  finding.name = "objective/invariance";
  finding.informational = true;
  finding.scale = std::numeric_limits<double>::infinity();  // must become null
  finding.diagnosis = {diag::kObjectiveNotInvariant, "", kNaN, "micro_batch scope depends on dp", ""};

  report.checks = {passing, failing, finding};
  report.reference = {"fd-logit-chain", 1e-6, 3e-11, 2, 0, 1, 0.0123, 0.0, 1.5, 0.25};
  report.timing = {0.25, 0.5, 0.8};
  return report;
}

Report passingReport() {
  Report report = sampleReport();
  report.checks.erase(report.checks.begin() + 1);
  report.verdict = "pass";
  return report;
}

json loadSchema() {
  const std::string path = std::string(MOE_SOURCE_DIR) + "/schema/report.schema.json";
  std::ifstream in(path);
  EXPECT_TRUE(in.good()) << "cannot open " << path;
  return json::parse(in);
}

json renderJson(const Report& report) {
  return json::parse(renderToString(JsonReporter{}, report));
}

// ---------------------------------------------------------------- mini JSON Schema validator
// Supports what schema/report.schema.json uses: type (string or list), enum, required, properties,
// additionalProperties: false, items, and local "$ref": "#/...".

bool typeMatches(const json& value, const std::string& type) {
  if (type == "object") return value.is_object();
  if (type == "array") return value.is_array();
  if (type == "string") return value.is_string();
  if (type == "boolean") return value.is_boolean();
  if (type == "null") return value.is_null();
  if (type == "integer") return value.is_number_integer();
  if (type == "number") return value.is_number();
  ADD_FAILURE() << "schema uses an unsupported type " << type;
  return false;
}

void validateAgainst(const json& value, const json& schema_node, const json& root, const std::string& path,
                     std::vector<std::string>& errors) {
  const json* schema = &schema_node;
  while (schema->contains("$ref")) {
    const std::string ref = (*schema)["$ref"].get<std::string>();
    if (ref.rfind("#", 0) != 0) {
      errors.push_back(path + ": non-local $ref " + ref);
      return;
    }
    schema = &root.at(json::json_pointer(ref.substr(1)));
  }
  if (schema->contains("type")) {
    const json& type = (*schema)["type"];
    bool matched = false;
    if (type.is_string()) {
      matched = typeMatches(value, type.get<std::string>());
    } else {
      for (const json& t : type) matched = matched || typeMatches(value, t.get<std::string>());
    }
    if (!matched) {
      errors.push_back(path + ": type " + std::string(value.type_name()) + " is not " + type.dump());
      return;
    }
  }
  if (schema->contains("enum")) {
    bool found = false;
    for (const json& allowed : (*schema)["enum"]) found = found || allowed == value;
    if (!found) errors.push_back(path + ": " + value.dump() + " not in enum " + (*schema)["enum"].dump());
  }
  if (value.is_object()) {
    if (schema->contains("required")) {
      for (const json& key : (*schema)["required"]) {
        if (!value.contains(key.get<std::string>())) errors.push_back(path + ": missing required " + key.dump());
      }
    }
    const bool closed = schema->value("additionalProperties", true) == false;
    const json properties = schema->value("properties", json::object());
    for (const auto& [key, member] : value.items()) {
      if (properties.contains(key)) {
        validateAgainst(member, properties[key], root, path + "/" + key, errors);
      } else if (closed) {
        errors.push_back(path + ": key \"" + key + "\" is not in the schema");
      }
    }
  }
  if (value.is_array() && schema->contains("items")) {
    for (std::size_t i = 0; i < value.size(); ++i) {
      validateAgainst(value[i], (*schema)["items"], root, path + "/" + std::to_string(i), errors);
    }
  }
}

std::vector<std::string> schemaErrors(const json& value) {
  const json schema = loadSchema();
  std::vector<std::string> errors;
  validateAgainst(value, schema, schema, "", errors);
  return errors;
}

std::string joined(const std::vector<std::string>& lines) {
  std::string text;
  for (const std::string& line : lines) text += line + "\n";
  return text;
}

// ---------------------------------------------------------------- mini XML well-formedness checker
// Enough XML 1.0 to catch what a writer can get wrong: tag nesting, attribute quoting and
// uniqueness, raw '<' or '&' in text or attributes, unknown entities. Counts elements by name.

struct XmlCheck {
  bool ok = true;
  std::string error;
  std::map<std::string, int> element_counts;
  std::vector<std::map<std::string, std::string>> attributes_of;  // in document order
  std::vector<std::string> element_order;
  std::string text;  // all character data, unescaped, concatenated
};

std::string unescapeEntities(const std::string& raw, std::string& error) {
  std::string out;
  for (std::size_t i = 0; i < raw.size(); ++i) {
    if (raw[i] == '<') {
      error = "raw '<' in text or attribute";
      return out;
    }
    if (raw[i] != '&') {
      out += raw[i];
      continue;
    }
    const std::size_t semi = raw.find(';', i);
    if (semi == std::string::npos) {
      error = "unterminated entity";
      return out;
    }
    const std::string entity = raw.substr(i + 1, semi - i - 1);
    static const std::map<std::string, char> named = {
        {"amp", '&'}, {"lt", '<'}, {"gt", '>'}, {"quot", '"'}, {"apos", '\''}};
    if (named.count(entity)) {
      out += named.at(entity);
    } else if (entity.size() > 1 && entity[0] == '#' &&
               entity.find_first_not_of("0123456789", 1) == std::string::npos) {
      out += static_cast<char>(std::stoi(entity.substr(1)));
    } else {
      error = "unknown entity &" + entity + ";";
      return out;
    }
    i = semi;
  }
  return out;
}

XmlCheck checkXml(const std::string& doc) {
  XmlCheck result;
  auto fail = [&](const std::string& why, std::size_t at) {
    result.ok = false;
    result.error = why + " at offset " + std::to_string(at);
    return result;
  };
  std::vector<std::string> open;
  std::size_t i = 0;
  bool root_seen = false;
  if (doc.rfind("<?xml", 0) == 0) i = doc.find("?>") + 2;
  while (i < doc.size()) {
    if (doc[i] != '<') {
      const std::size_t next = doc.find('<', i);
      const std::string raw = doc.substr(i, next == std::string::npos ? std::string::npos : next - i);
      if (open.empty() && raw.find_first_not_of(" \t\r\n") != std::string::npos) {
        return fail("text outside the root element", i);
      }
      std::string error;
      result.text += unescapeEntities(raw, error);
      if (!error.empty()) return fail(error, i);
      if (next == std::string::npos) break;
      i = next;
      continue;
    }
    if (doc.compare(i, 2, "</") == 0) {
      const std::size_t end = doc.find('>', i);
      if (end == std::string::npos) return fail("unterminated end tag", i);
      const std::string name = doc.substr(i + 2, end - i - 2);
      if (open.empty() || open.back() != name) return fail("end tag </" + name + "> does not match", i);
      open.pop_back();
      i = end + 1;
      continue;
    }
    // Start tag: name, attributes, optional "/".
    std::size_t j = i + 1;
    while (j < doc.size() && (std::isalnum(static_cast<unsigned char>(doc[j])) || doc[j] == '-' ||
                              doc[j] == '_' || doc[j] == ':'))
      ++j;
    const std::string name = doc.substr(i + 1, j - i - 1);
    if (name.empty()) return fail("empty tag name", i);
    if (open.empty() && root_seen) return fail("second root element", i);
    root_seen = true;
    std::map<std::string, std::string> attributes;
    while (true) {
      while (j < doc.size() && std::isspace(static_cast<unsigned char>(doc[j]))) ++j;
      if (j >= doc.size()) return fail("unterminated start tag", i);
      if (doc[j] == '>' || doc.compare(j, 2, "/>") == 0) break;
      const std::size_t eq = doc.find('=', j);
      if (eq == std::string::npos || doc[eq + 1] != '"') return fail("attribute without quoted value", j);
      const std::string attribute = doc.substr(j, eq - j);
      const std::size_t close = doc.find('"', eq + 2);
      if (close == std::string::npos) return fail("unterminated attribute", j);
      std::string error;
      const std::string value = unescapeEntities(doc.substr(eq + 2, close - eq - 2), error);
      if (!error.empty()) return fail(error + " in attribute " + attribute, j);
      if (!attributes.emplace(attribute, value).second) return fail("duplicate attribute " + attribute, j);
      j = close + 1;
      if (j < doc.size() && !std::isspace(static_cast<unsigned char>(doc[j])) && doc[j] != '>' && doc[j] != '/') {
        return fail("no space between attributes", j);
      }
    }
    ++result.element_counts[name];
    result.attributes_of.push_back(attributes);
    result.element_order.push_back(name);
    if (doc[j] == '/') {
      i = j + 2;
    } else {
      open.push_back(name);
      i = j + 1;
    }
  }
  if (!open.empty()) return fail("unclosed element <" + open.back() + ">", doc.size());
  if (!root_seen) return fail("no root element", 0);
  return result;
}

const std::map<std::string, std::string>& firstAttributesOf(const XmlCheck& xml, const std::string& name) {
  for (std::size_t i = 0; i < xml.element_order.size(); ++i) {
    if (xml.element_order[i] == name) return xml.attributes_of[i];
  }
  static const std::map<std::string, std::string> none;
  ADD_FAILURE() << "no element " << name;
  return none;
}

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
  for (const Report& report : {sampleReport(), passingReport(), Report{}}) {
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
  const json schema = loadSchema();
  const json& codes = schema["$defs"]["diagnosis"]["properties"]["code"]["enum"];
  const std::set<std::string> in_schema(codes.begin(), codes.end());
  const std::set<std::string> in_code = {diag::kAuxGradMissing,       diag::kAuxGradScaled,
                                         diag::kAuxGradDirection,     diag::kAuxCoeffNonlinear,
                                         diag::kMainGradMismatch,     diag::kObjectiveNotInvariant,
                                         diag::kFdUnreliable};
  EXPECT_EQ(in_schema, in_code);
}

TEST(ReportJson, ContentAndKeys) {
  const json j = renderJson(sampleReport());
  EXPECT_EQ(j["schema_version"], 1);
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
  const std::string text = renderToString(JsonReporter{}, sampleReport());
  for (const char* literal : {": NaN", ": nan", ": -nan", ": inf", ": -inf", "Infinity"}) {
    EXPECT_EQ(text.find(literal), std::string::npos) << literal;
  }
  const json j = json::parse(text);
  EXPECT_TRUE(j["checks"][1]["cosine"].is_null());
  EXPECT_TRUE(j["checks"][2]["scale"].is_null());
  EXPECT_TRUE(j["checks"][2]["diagnosis"]["value"].is_null());
  EXPECT_DOUBLE_EQ(j["checks"][1]["scale"].get<double>(), 0.5);
}

TEST(ReportJson, VerdictDerivedWhenUnset) {
  Report report = sampleReport();
  report.verdict.clear();
  EXPECT_EQ(renderJson(report)["verdict"], "fail");
  report.checks[1].ok = true;
  EXPECT_EQ(renderJson(report)["verdict"], "pass");
  report.checks[2].ok = false;  // informational: does not change the verdict
  EXPECT_EQ(renderJson(report)["verdict"], "pass");
}

TEST(ReportJson, InvalidScenarioJsonIsARuntimeFailure) {
  Report report = sampleReport();
  report.scenario_json = "{not json";
  EXPECT_THROW(renderToString(JsonReporter{}, report), RuntimeFailure);
  EXPECT_THROW(renderToString(ConsoleReporter{}, report), RuntimeFailure);
  EXPECT_THROW(renderToString(JUnitReporter{}, report), RuntimeFailure);
}

// ================================================================ JUnit

TEST(ReportJUnit, WellFormedWithCountsAndEscaping) {
  Report report = sampleReport();
  report.expectation_met = false;  // a real failure: the failing check is a <failure>
  report.checks[0].name = "name with <angle> & \"quotes\"";
  const std::string xml_text = renderToString(JUnitReporter{}, report);
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
  const XmlCheck xml = checkXml(renderToString(JUnitReporter{}, report));
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
  const XmlCheck xml = checkXml(renderToString(JUnitReporter{}, report));
  ASSERT_TRUE(xml.ok) << xml.error;
  EXPECT_EQ(xml.text.find('\x07'), std::string::npos);

  const XmlCheck empty = checkXml(renderToString(JUnitReporter{}, Report{}));
  ASSERT_TRUE(empty.ok) << empty.error;
  EXPECT_EQ(empty.element_counts.count("testcase"), 0u);
  EXPECT_EQ(firstAttributesOf(empty, "testsuite").at("name"), "unnamed");
}

TEST(ReportJUnit, PassingReportHasNoFailures) {
  const XmlCheck xml = checkXml(renderToString(JUnitReporter{}, passingReport()));
  ASSERT_TRUE(xml.ok) << xml.error;
  EXPECT_EQ(xml.element_counts.count("failure"), 0u);
  EXPECT_EQ(firstAttributesOf(xml, "testsuite").at("failures"), "0");
  EXPECT_EQ(firstAttributesOf(xml, "testsuite").at("tests"), "2");
}

// ================================================================ console

TEST(ReportConsole, FooterSaysFailedAndListsDiagnosis) {
  const std::string text = renderToString(ConsoleReporter{}, sampleReport());
  EXPECT_NE(text.find("# moe-lbcheck: FAILED (1 of 2 checks failed, 1 informational)"), std::string::npos)
      << text;
  EXPECT_NE(text.find("# expectation: met"), std::string::npos);
  EXPECT_NE(text.find("-> AUX_GRAD_SCALED factor=1/dp"), std::string::npos);
  EXPECT_NE(text.find("; fix: fix " + kNastyText), std::string::npos);
  EXPECT_NE(text.find("dp=2 pp=2 cp=1 M=2 world=4 backend=emulated"), std::string::npos);
  EXPECT_NE(text.find("# preset: nemo_automodel"), std::string::npos);
  EXPECT_NE(text.find("automodel-1408"), std::string::npos);
  EXPECT_NE(text.find("near-ties=2"), std::string::npos);
  EXPECT_NE(text.find("200/256"), std::string::npos);
  EXPECT_NE(text.find("INFO"), std::string::npos);
  EXPECT_EQ(text.find("nan"), std::string::npos);  // NaN prints as "-"
  // The footer is the last two lines.
  const std::string tail = text.substr(text.rfind("# moe-lbcheck:"));
  EXPECT_EQ(tail, "# moe-lbcheck: FAILED (1 of 2 checks failed, 1 informational)\n# expectation: met\n");
}

TEST(ReportConsole, FooterSaysOk) {
  Report report = passingReport();
  const std::string text = renderToString(ConsoleReporter{}, report);
  EXPECT_NE(text.find("# moe-lbcheck: OK (1 checks, 0 failed, 1 informational)"), std::string::npos) << text;
  EXPECT_EQ(text.find("FAILED"), std::string::npos);

  report.expectation_met = false;
  report.expectation_detail = "expected verdict fail with AUX_GRAD_MISSING, got pass";
  const std::string unmet = renderToString(ConsoleReporter{}, report);
  EXPECT_NE(unmet.find("# expectation: not met (expected verdict fail with AUX_GRAD_MISSING, got pass)"),
            std::string::npos);
}

TEST(ReportConsole, TableColumnsLineUp) {
  const std::string text = renderToString(ConsoleReporter{}, sampleReport());
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
  const std::string text = renderToString(ConsoleReporter{ConsoleOptions{true}}, sampleReport());
  EXPECT_NE(text.find("aux_grad/layer1/router_weight"), std::string::npos);
  EXPECT_NE(text.find("-> AUX_GRAD_SCALED"), std::string::npos);
  EXPECT_EQ(text.find("aux_grad/layer0/router_weight"), std::string::npos);
  EXPECT_EQ(text.find("objective/invariance"), std::string::npos);
  EXPECT_EQ(text.find("# reference:"), std::string::npos);
  EXPECT_NE(text.find("# moe-lbcheck: FAILED"), std::string::npos);

  const std::string quiet_pass = renderToString(ConsoleReporter{ConsoleOptions{true}}, passingReport());
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
  writeFileAtomically(target.string(), renderToString(JUnitReporter{}, sampleReport()));
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
