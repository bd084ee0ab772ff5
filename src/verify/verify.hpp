// `moe-lbcheck verify`: the gradient a real training job produced, from its capture (one safetensors
// file per rank, docs/capture-format.md), checked against the float64 layer-local reference of the
// objective its manifest declares, through the same check pipeline and reporters as `run`.
// Torch-free: verify needs no LibTorch.
#pragma once

#include <string>

#include "capture/capture.hpp"
#include "reference/reference.hpp"
#include "report/report.hpp"

namespace moe {

struct VerifyOptions {
  double rtol = 0.0;     // 0 = from the coarser of the manifest's compute_dtype and the gradient's dtype
  Expectation expect;    // what exit code 0 means (default: every check passes)
  ReferenceOptions reference;
};

// The default relative tolerance of a capture: the coarser of its compute dtype's and its gradient
// dtype's (F64 1e-7, F32 1e-4, F16 1e-2, BF16 2e-1).
double defaultCaptureRtol(const Capture& capture);

// Checks of every layer of a loaded capture: aux_grad/layer{l}/router_weight (the lowest rank's
// gradient against the reference), replicas/layer{l}, routing/layer{l} and, when near-ties froze
// logits, reference/routing_margins. `load_seconds` is reported as timing.load_s.
Report verifyCapture(const Capture& capture, const VerifyOptions& options, const ToolInfo& tool,
                     double load_seconds = 0.0);

// Loads CAPTURE_DIR (InputError on any violation of the contract) and verifies it.
Report verifyCaptureDirectory(const std::string& directory, const VerifyOptions& options, const ToolInfo& tool);

// Parses --expect "verdict=pass|fail,diagnosis=CODE,factor=F" (any subset; verdict defaults to fail
// when a diagnosis or factor is given, else pass). Throws UsageError naming the bad item.
Expectation parseExpectation(const std::string& text);

}  // namespace moe
