// The reporter seam (DESIGN §2, §6): one interface, three writers of a Report (console text in the
// style of nccl-tests, JSON schema_version 1 as described by schema/report.schema.json, JUnit XML),
// plus an atomic file writer so that no partial report is ever left behind. Torch-free.
#pragma once

#include <ostream>
#include <string>
#include <utility>
#include <vector>

#include "report/report.hpp"

namespace moe {

// Writes one Report to a stream. Implementations never modify the Report, never exit and throw
// moe::Error subclasses only (a Report whose scenario_json is not valid JSON is a RuntimeFailure).
class Reporter {
 public:
  virtual ~Reporter() = default;
  virtual void write(const Report& report, std::ostream& out) const = 0;
};

struct ConsoleOptions {
  bool quiet = false;  // print only the failing checks (with their diagnosis) and the footer
};

// Human-readable text: '#'-prefixed header lines (scenario, mesh, preset), a fixed-width table with
// one row per check (NaN printed as "-"), one "  -> CODE ..." line per diagnosis, the reference and
// timing lines, and a footer that always ends with
//   "# moe-lbcheck: OK (N checks, 0 failed)"  or  "# moe-lbcheck: FAILED (F of N checks failed)"
//   "# expectation: met" / "# expectation: not met (detail)".
// N counts the checks that decide the verdict (informational ones are listed separately).
class ConsoleReporter : public Reporter {
 public:
  explicit ConsoleReporter(ConsoleOptions options = {}) : options_(options) {}
  void write(const Report& report, std::ostream& out) const override;

 private:
  ConsoleOptions options_;
};

struct JsonOptions {
  int indent = 2;  // < 0: one line
};

// The JSON report of DESIGN §6, schema_version 1; schema/report.schema.json is its contract and the
// tests validate the output against it. Key order is stable. NaN and infinities are written as null
// (JSON has no NaN). `verdict` is Report::verdict, or derived from the checks when that is empty.
class JsonReporter : public Reporter {
 public:
  explicit JsonReporter(JsonOptions options = {}) : options_(options) {}
  void write(const Report& report, std::ostream& out) const override;

 private:
  JsonOptions options_;
};

// A well-formed JUnit XML document: <testsuites><testsuite name=SCENARIO ...> with one <testcase>
// per check (classname "moe-lbcheck.<scenario name>"). Failing checks carry a <failure> whose message
// holds scale, cosine and diagnosis; informational checks pass and carry their finding in
// <system-out>. The mesh, the expectation and the reference go into <properties>. Every attribute
// and text is XML-escaped; characters XML 1.0 forbids are replaced by '?'.
class JUnitReporter : public Reporter {
 public:
  void write(const Report& report, std::ostream& out) const override;
};

// Escapes text for XML 1.0 attributes (attribute = true) or element content. Characters XML 1.0
// cannot carry at all (controls other than tab, newline, carriage return) become '?'.
std::string xmlEscape(const std::string& text, bool attribute);

// The reporter's output as a string.
std::string renderToString(const Reporter& reporter, const Report& report);

// "pass" when every non-informational check is ok, else "fail"; Report::verdict when it is set.
std::string effectiveVerdict(const Report& report);

// Writes `content` to `path` atomically: a temp file in the same directory is written, flushed to
// disk and renamed over `path`, so readers see either the old file or the complete new one, and no
// temp file is left behind on failure. Throws moe::RuntimeFailure naming the path on I/O errors
// (including a directory that does not exist).
void writeFileAtomically(const std::string& path, const std::string& content);

// Writes several (path, content) files with writeFileAtomically; when one fails, the ones already
// written are removed again, so a failure never leaves a partial set of outputs. Empty paths are
// skipped. Returns the paths written.
std::vector<std::string> writeFilesAtomically(
    const std::vector<std::pair<std::string, std::string>>& files);

}  // namespace moe
