// The reporter seam, in google/benchmark's shape: a reporter gets the report's context, then its rows
// (possibly in several calls, as they are produced), then the summary. Three implementations write
// every kind of report (run, sweep, selftest, verify): console text in the style of nccl-tests,
// JSON (schema_version 1, "kind", one schema per kind in schema/) and JUnit XML. Plus an atomic file
// writer so that no partial report is ever left behind. Torch-free.
#pragma once

#include <ostream>
#include <string>
#include <utility>
#include <vector>

#include "report/report.hpp"

namespace moe {

// Writes one report to the stream it was given. Implementations never modify what they are given,
// never exit and throw moe::Error subclasses only. reportContext is called first and once,
// reportRows any number of times, finalize last and once.
class Reporter {
 public:
  virtual ~Reporter() = default;
  virtual void reportContext(const ReportContext& context) = 0;
  virtual void reportRows(const std::vector<CheckResult>& rows) = 0;
  virtual void finalize(const ReportSummary& summary) = 0;
};

// A reporter that keeps the context and every row for its finalize (what JSON and JUnit need whole,
// and what the console footer counts); out is the stream it writes to.
class CollectingReporter : public Reporter {
 public:
  explicit CollectingReporter(std::ostream& out) : out_(out) {}
  void reportContext(const ReportContext& context) override { context_ = context; }
  void reportRows(const std::vector<CheckResult>& rows) override {
    rows_.insert(rows_.end(), rows.begin(), rows.end());
  }

 protected:
  std::ostream& out_;
  ReportContext context_;
  std::vector<CheckResult> rows_;
};

// Feeds a whole report to a reporter: context, all rows, summary.
void writeReport(const Report& report, Reporter& reporter);

struct ConsoleOptions {
  bool quiet = false;  // print only the failing rows (with their diagnosis) and the footer
};

// Human-readable text: '#'-prefixed header lines, a fixed-width table with one row per check
// (layout, fault; NaN printed as "-"), one "  -> CODE ..." line per diagnosis, the reference and
// timing lines, and a footer that always ends with
//   "# moe-lbcheck: OK (N checks, 0 failed)"  or  "# moe-lbcheck: FAILED (F of N checks failed)"
// ("sweep: OK (N layouts...", "selftest: OK (N faults flagged...") and, for run and verify,
//   "# expectation: met" / "# expectation: not met (detail)".
// N counts the rows that decide the verdict (informational ones are listed separately).
class ConsoleReporter : public CollectingReporter {
 public:
  explicit ConsoleReporter(std::ostream& out, ConsoleOptions options = {});
  void reportContext(const ReportContext& context) override;       // writes the header lines
  void reportRows(const std::vector<CheckResult>& rows) override;  // streams sweep and selftest rows
  void finalize(const ReportSummary& summary) override;

 private:
  ConsoleOptions options_;
  bool header_written_ = false;
};

struct JsonOptions {
  int indent = 2;  // < 0: one line
};

// The JSON report, schema_version 1 with "kind"; schema/<kind>.schema.json (report.schema.json for
// run) is its contract and tests validate real output against it. Key order is stable. NaN and
// infinities are written as null (JSON has no NaN). Everything is written by finalize.
class JsonReporter : public CollectingReporter {
 public:
  explicit JsonReporter(std::ostream& out, JsonOptions options = {}) : CollectingReporter(out), options_(options) {}
  void finalize(const ReportSummary& summary) override;

 private:
  JsonOptions options_;
};

// A well-formed JUnit XML document: <testsuites><testsuite name=...> with one <testcase> per row
// (classname "moe-lbcheck.<scenario name>", "moe-lbcheck.sweep", "moe-lbcheck.selftest" or
// "moe-lbcheck.verify"). Failing rows carry a <failure> whose message holds scale, cosine and
// diagnosis; informational rows pass and carry their finding in <system-out>. When a report meets an
// expectation of failure (a scenario that reproduces a bug), its failing rows are <skipped>
// ("expected failure"), so CI dashboards agree with the exit code. Every attribute and text is
// XML-escaped; characters XML 1.0 forbids are replaced by '?'. Everything is written by finalize.
class JUnitReporter : public CollectingReporter {
 public:
  explicit JUnitReporter(std::ostream& out) : CollectingReporter(out) {}
  void finalize(const ReportSummary& summary) override;
};

enum class ReportFormat { kConsole, kJson, kJUnit };

// The whole report rendered in one format.
std::string renderReport(const Report& report, ReportFormat format, ConsoleOptions console = {});

// Escapes text for XML 1.0 attributes (attribute = true) or element content. Characters XML 1.0
// cannot carry at all (controls other than tab, newline, carriage return) become '?'.
std::string xmlEscape(const std::string& text, bool attribute);

// Writes `content` to `path` atomically: a temp file in the same directory is written, flushed to
// disk and renamed over `path`, so readers see either the old file or the complete new one, and no
// temp file is left behind on failure. Throws moe::RuntimeFailure naming the path on I/O errors
// (including a directory that does not exist).
void writeFileAtomically(const std::string& path, const std::string& content);

// Writes several (path, content) files with writeFileAtomically; when one fails, the ones already
// written are removed again, so a failure never leaves a partial set of outputs. Empty paths are
// skipped. Returns the paths written.
std::vector<std::string> writeFilesAtomically(const std::vector<std::pair<std::string, std::string>>& files);

}  // namespace moe
