// `moe-lbcheck verify CAPTURE_DIR [options]`: check the gradient a real training job captured.
#include <iostream>
#include <memory>
#include <string>

#include "app/tool_info.hpp"
#include "cli/commands.hpp"
#include "cli/report_output.hpp"
#include "common/errors.hpp"
#include "report/reporters.hpp"
#include "verify/verify.hpp"

namespace moe::cli {

struct VerifyCliOptions {
  std::string capture_dir;
  ReportOutputOptions output;
  double rtol = 0.0;
  std::string expect;
};

int runVerifyCommand(const VerifyCliOptions& opt) {
  VerifyOptions options;
  options.rtol = opt.rtol;
  options.expect = parseExpectation(opt.expect);
  const Report report = verifyCaptureDirectory(opt.capture_dir, options, toolInfo());
  // Render everything first, then write: a failure never leaves a partial set of outputs.
  const std::string console = renderReport(report, ReportFormat::kConsole, ConsoleOptions{opt.output.quiet});
  writeReportFiles(report, opt.output);
  std::cout << console << std::flush;
  return report.summary.expectation_met ? 0 : static_cast<int>(ExitCode::kCheckFailed);
}

void setupVerifyCommand(CLI::App& app, int& exit_code) {
  auto opt = std::make_shared<VerifyCliOptions>();
  CLI::App* sub = app.add_subcommand("verify", "Check the aux-loss gradient a real training job captured");
  sub->add_option("capture", opt->capture_dir, "Capture directory (rank{R}.safetensors per rank)")->required();
  addReportOutputOptions(*sub, opt->output, "verify", "check", "Print only failures and the footer");
  sub->add_option("--rtol", opt->rtol,
                  "Relative tolerance (default: from the coarser of the manifest's compute_dtype and the "
                  "gradient's dtype: float64 1e-7, float32 1e-4, float16 1e-2, bfloat16 0.2)")
      ->check(CLI::Range(0.0, 1.0));
  sub->add_option("--expect", opt->expect,
                  "What exit code 0 means, e.g. verdict=fail,diagnosis=AUX_GRAD_SCALED,factor=1/dp (default: "
                  "every check passes)");
  sub->callback([opt, &exit_code] { exit_code = runVerifyCommand(*opt); });
}

}  // namespace moe::cli
