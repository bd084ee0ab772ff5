// One file per subcommand (CLI11 example style): an options struct, a setup function that declares
// the options with their validators, and a run function that returns the exit code. Errors are
// thrown and mapped to exit codes in main.cpp only.
#pragma once

#include <CLI/CLI.hpp>

namespace moe::cli {

// Each setup function adds its subcommand to `app`; when that subcommand is parsed, its callback
// stores the run function's exit code in `exit_code`.
void setupRunCommand(CLI::App& app, int& exit_code);
void setupValidateCommand(CLI::App& app, int& exit_code);
void setupListCommand(CLI::App& app, int& exit_code);
void setupSweepCommand(CLI::App& app, int& exit_code);
void setupSelftestCommand(CLI::App& app, int& exit_code);
void setupVerifyCommand(CLI::App& app, int& exit_code);

}  // namespace moe::cli
