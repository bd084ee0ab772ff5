// How a moe-lbcheck program turns what reached main() into a message on stderr and an exit code
// (common/errors.hpp: 2 invalid usage or input, 3 runtime failure). Shared by moe-lbcheck and the
// torch-free input driver moe-lbcheck-inputs, so both say the same thing for the same bad input.
// Header-only and torch-free.
#pragma once

#include <CLI/CLI.hpp>

#include <exception>
#include <iostream>
#include <string>

#include "common/errors.hpp"

namespace moe::cli {

// CLI11 reports an unknown subcommand as "A subcommand is required": name it instead. Returns the
// exit code (2) when argv[1] is neither an option nor one of app's subcommands, else -1.
// `expected` lists the subcommands for the message ("run, verify or list").
inline int rejectUnknownSubcommand(const CLI::App& app, int argc, char** argv, const std::string& program,
                                   const std::string& expected) {
  if (argc <= 1 || argv[1][0] == '-') return -1;
  for (const CLI::App* sub : app.get_subcommands({})) {
    if (sub->get_name() == argv[1]) return -1;
  }
  std::cerr << program << ": unknown subcommand '" << argv[1] << "' (expected " << expected
            << "; see --help)\n";
  return static_cast<int>(ExitCode::kInvalidInput);
}

// A command-line parse error: CLI11 prints it; --help and --version exit 0, everything else is
// invalid usage (CLI11's own codes are 100+).
inline int exitCodeOfParseError(const CLI::App& app, const CLI::ParseError& e) {
  const int code = app.exit(e);
  return code == 0 ? 0 : static_cast<int>(ExitCode::kInvalidInput);
}

// Any other exception: a moe::Error prints "<program>: error: <message>" and returns its own exit
// code; anything else is a runtime failure (exit 3), printed without the C++ backtrace LibTorch's
// c10::Error appends.
inline int exitCodeOfError(const std::exception& e, const std::string& program) {
  if (const auto* error = dynamic_cast<const Error*>(&e)) {
    std::cerr << program << ": error: " << error->what() << "\n";
    return static_cast<int>(error->code());
  }
  std::cerr << program << ": runtime failure: " << withoutBacktrace(e.what()) << "\n";
  return static_cast<int>(ExitCode::kRuntimeFailure);
}

// The whole of a program's main() after its subcommands are set up: rejects an unknown subcommand,
// parses (which runs the chosen subcommand's callback, which sets exit_code) and maps every error to
// its exit code. This is the one place where the programs catch exceptions.
inline int parseAndRun(CLI::App& app, int argc, char** argv, const std::string& program,
                       const std::string& expected_subcommands, const int& exit_code) {
  const int unknown = rejectUnknownSubcommand(app, argc, argv, program, expected_subcommands);
  if (unknown >= 0) return unknown;
  try {
    app.parse(argc, argv);
    return exit_code;
  } catch (const CLI::ParseError& e) {
    return exitCodeOfParseError(app, e);
  } catch (const std::exception& e) {
    return exitCodeOfError(e, program);
  }
}

}  // namespace moe::cli
