// Problem data on disk (safetensors): the scenario's "bring your own router data" input and the
// --dump output. loadProblem itself is declared in data/problem.hpp; its file-reading half lives here.
#pragma once

#include <map>
#include <string>
#include <vector>

#include "data/problem.hpp"

namespace moe {

// Reads a problem from a safetensors file: x [B,S,H], y [B,S,H] (F64 or F32), valid [B,S] (U8 or
// BOOL, values 0/1), layer{l}.router_weight [H,E], layer{l}.expert_in [E,H,F], layer{l}.expert_out
// [E,F,H] for l < model.layers. Sizes must match the scenario; other tensors (e.g. the gradients of a
// dump) are ignored. Every mismatch throws InputError(scenario file, "/data/safetensors", ...) naming
// the tensor, its shape and the expected one; malformed files throw InputError(safetensors file, ...).
ProblemData loadProblemFromSafetensors(const Scenario& scenario, const std::string& safetensors_path);

// The path of scenario.data.safetensors: as given when absolute, else relative to the directory of
// scenario.source_file (the current directory when that is empty).
std::string resolveDataPath(const Scenario& scenario);

// Writes the problem and the router-weight gradients atomically to `path`: x, y, valid (U8),
// layer{l}.router_weight/expert_in/expert_out, grad.reference.layer{l}.router_weight and
// grad.mesh.layer{l}.router_weight (each [H,E]), all F64 except valid. A gradient list may be empty
// (then its tensors are left out); otherwise it needs one [H*E] vector per layer (std::invalid_argument
// if not). The file loads back with loadProblem (same sizes) to identical data. `metadata` is added to
// the file's __metadata__ (next to format, sizes and tool version).
void dumpProblemAndGradients(const std::string& path, const ProblemData& problem,
                             const std::vector<std::vector<double>>& reference_grads,
                             const std::vector<std::vector<double>>& mesh_grads,
                             const std::map<std::string, std::string>& metadata = {});

}  // namespace moe
