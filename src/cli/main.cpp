// moe-lbcheck: checks the load-balancing aux-loss gradient a parallel mesh (or a captured real job)
// produces against a single-device float64 finite-difference reference. See README.md. Every error
// reaches main() and is mapped there, by cli/error_exit.hpp's parseAndRun, to the exit codes of
// common/errors.hpp.
#include <iostream>
#include <string>

#include "cli/commands.hpp"
#include "cli/error_exit.hpp"
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
  return moe::cli::parseAndRun(app, argc, argv, "moe-lbcheck", "run, verify, sweep, validate, list or selftest",
                               exit_code);
}
