// The capture manifest: the JSON object every rank file carries under
// __metadata__["moe_lbcheck_capture"] (docs/capture-format.md, "The manifest"). Reading and writing
// share the key lists in capture_manifest.cpp, so the writer cannot emit a key the reader refuses.
#pragma once

#include <string>

#include "capture/capture.hpp"

namespace moe {

class SafetensorsView;

// The one __metadata__ key of a rank file.
constexpr const char* kCaptureManifestKey = "moe_lbcheck_capture";

// The manifest of one rank file, every rule that needs only this file checked: __metadata__ holds
// exactly the manifest key; the manifest is one JSON object without repeated keys; no unknown key at
// any level (with a did-you-mean hint); the required keys present; types, ranges and finiteness of
// every value; schema_version 1; router_inputs_detached true; main_loss_scale 0; every mesh size >= 1
// and coordinate in [0, size); world_size = dp_size * cp_size * pp_size * tp_size (ep is carved out
// of those ranks and does not multiply); rank in [0, world_size) and equal to `file_rank`, the R of
// the file's name; layers distinct (returned ascending). compute_dtype stays unfilled (given false)
// when absent: its default needs the gradients. Throws InputError(file, JSON pointer into the
// manifest such as "/mesh/dp_size", what was expected and found).
CaptureManifest readCaptureManifest(const SafetensorsView& file, int file_rank);

// The same checks on manifest text (`file` names it in messages); `file_rank` < 0 skips the file-name
// rule.
CaptureManifest parseCaptureManifest(const std::string& text, const std::string& file, int file_rank);

// The manifest as JSON text with every key of the format, in the documented order (compute_dtype
// only when compute_dtype_given: otherwise readers take the gradient's dtype).
std::string captureManifestToJson(const CaptureManifest& manifest);

}  // namespace moe
