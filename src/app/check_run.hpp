// One `moe-lbcheck run`: the reference, the mesh runs that isolate the aux gradient, the evidence
// handed to the check pipeline (src/check/pipeline.hpp) and the typed report. The CLI only parses
// options and writes files; everything else happens here. Torch-free header.
#pragma once

#include <optional>
#include <string>
#include <vector>

#include "data/problem.hpp"
#include "reference/reference.hpp"
#include "report/report.hpp"
#include "scenario/scenario.hpp"
#include "sim/mesh_backend.hpp"

namespace moe {

struct CheckRunOptions {
  int directional_checks = 2;
  // Also run the step the way a capture records it (router inputs detached, main loss x 0) and keep
  // every rank's router inputs and gradients (run --capture).
  bool capture = false;
};

struct CheckRunOutput {
  Report report;
  ProblemData data;
  std::vector<std::vector<double>> reference_aux_grad;  // per layer [H*E]
  std::vector<std::vector<double>> mesh_aux_grad;
  std::optional<MeshRunResult> capture_run;  // CheckRunOptions::capture
  // Where the run's time went (bench/bench_run): the reference's phases, each mesh run by name
  // ("aux", "aux x2", "main", "capture"), and the checks that follow them.
  struct Phases {
    double load_s = 0.0;
    ReferenceResult::Phases reference;
    std::vector<std::pair<std::string, double>> mesh_runs;
    double checks_s = 0.0;
  } phases;
};

// Runs every check of a run on a validated scenario with the given backend. Throws RuntimeFailure
// when the mesh fails, InputError when the scenario's preset cannot express one of its faults.
CheckRunOutput runChecks(const Scenario& scenario, MeshBackend& backend, const CheckRunOptions& options = {});

}  // namespace moe
