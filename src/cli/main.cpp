// moe-lbcheck: checks the load-balancing aux-loss gradient a parallel mesh (or a captured real job)
// produces against a single-device float64 finite-difference reference. See README.md. Every error is
// caught here, and only here, and mapped to the exit codes of common/errors.hpp.
#include <iostream>
#include <string>

#include "cli/commands.hpp"
#include "common/errors.hpp"
#include "common/interrupt.hpp"

int main(int argc, char** argv) {
  moe::interrupt::exitOnSignal();  // SIGINT/SIGTERM: unfinished outputs removed, exit 130/143
  CLI::App app{"moe-lbcheck: verify MoE load-balancing aux-loss gradients under parallel meshes and in captures of real jobs"};
  app.require_subcommand(1);
  app.set_version_flag("--version", std::string(MOE_VERSION));
  int exit_code = 0;
  moe::cli::setupRunCommand(app, exit_code);
  moe::cli::setupSweepCommand(app, exit_code);
  moe::cli::setupValidateCommand(app, exit_code);
  moe::cli::setupListCommand(app, exit_code);
  moe::cli::setupSelftestCommand(app, exit_code);
  moe::cli::setupVerifyCommand(app, exit_code);
  // CLI11 reports an unknown subcommand as "A subcommand is required"; name it instead.
  if (argc > 1 && argv[1][0] != '-') {
    bool known = false;
    for (const CLI::App* sub : app.get_subcommands({})) known |= sub->get_name() == argv[1];
    if (!known) {
      std::cerr << "moe-lbcheck: unknown subcommand '" << argv[1]
                << "' (expected run, verify, sweep, validate, list or selftest; see --help)\n";
      return static_cast<int>(moe::ExitCode::kInvalidInput);
    }
  }
  try {
    app.parse(argc, argv);
    return exit_code;
  } catch (const CLI::ParseError& e) {
    // CLI11 uses 100+ for parse errors; invalid usage is exit code 2. --help/--version are 0.
    const int code = app.exit(e);
    return code == 0 ? 0 : static_cast<int>(moe::ExitCode::kInvalidInput);
  } catch (const moe::Error& e) {
    std::cerr << "moe-lbcheck: error: " << e.what() << "\n";
    return static_cast<int>(e.code());
  } catch (const std::exception& e) {
    // LibTorch's c10::Error appends a C++ backtrace to its message; keep only the message.
    std::cerr << "moe-lbcheck: runtime failure: " << moe::withoutBacktrace(e.what()) << "\n";
    return static_cast<int>(moe::ExitCode::kRuntimeFailure);
  }
}
