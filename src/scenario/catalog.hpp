// The catalog of framework presets and named faults: names, one-line summaries, sources and the
// signature each fault is expected to produce. Torch-free, so validation and `list` need no model.
#pragma once

#include <string>
#include <vector>

#include "scenario/scenario.hpp"

namespace moe {

struct PresetInfo {
  std::string name;
  std::string summary;  // one line: how it injects and scales the aux gradient
  std::string source;   // files / PRs it follows (ANCHORS.md section)
  MainLossScope main_loss_scope;
  GroupWeighting aux_group_weighting;  // kUniform or kTokens: how the preset averages aux groups
};

struct FaultInfo {
  std::string name;
  std::string summary;             // the mechanism, one line
  std::string source;              // issue / PR it reproduces
  std::string expected_diagnosis;  // diagnosis code the tool must report
  std::string expected_factor;     // attributed factor ("1/dp", "M", "0", ...) or "" (direction)
};

const std::vector<PresetInfo>& presetCatalog();
const std::vector<FaultInfo>& faultCatalog();
// nullptr when unknown.
const PresetInfo* findPreset(const std::string& name);
const FaultInfo* findFault(const std::string& name);

}  // namespace moe
