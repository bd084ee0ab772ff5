// `run --capture DIR`: the tool's own mesh step written in the capture format a real job writes
// (router inputs detached, main loss x 0), so that `verify` can judge it like any real job's.
#pragma once

#include <string>
#include <vector>

#include "capture/capture_writer.hpp"
#include "data/problem.hpp"
#include "scenario/scenario.hpp"
#include "sim/mesh_backend.hpp"

namespace moe {

// One rank record per rank of a mesh run made with detach_router_inputs and record_router_inputs:
// its coordinates and sizes, its layers' weights and gradients (transposed to nn.Linear's [E, H]),
// its router inputs per microbatch and its routing, all float64; the objective is the resolved
// scenario's.
std::vector<CaptureRankRecord> captureOfMeshRun(const Scenario& scenario, const ProblemData& data,
                                                const MeshRunResult& run, const std::string& backend);

// Throws UsageError unless `directory` can take a capture (absent, or an empty directory).
void requireCaptureDirectoryFree(const std::string& directory);

// Writes the capture into `directory` as a whole: into a sibling temporary directory first, renamed
// into place, so that a failure leaves no partial capture. Throws RuntimeFailure naming the path.
void writeCaptureDirectory(const std::string& directory, const std::vector<CaptureRankRecord>& ranks);

}  // namespace moe
