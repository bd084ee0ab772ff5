#include "common/diagnosis_code.hpp"

#include <utility>

namespace moe {
namespace {

const std::pair<DiagnosisCode, const char*> kNames[] = {
    {DiagnosisCode::kAuxGradMissing, "AUX_GRAD_MISSING"},
    {DiagnosisCode::kAuxGradScaled, "AUX_GRAD_SCALED"},
    {DiagnosisCode::kAuxGradDirection, "AUX_GRAD_DIRECTION"},
    {DiagnosisCode::kAuxCoeffNonlinear, "AUX_COEFF_NONLINEAR"},
    {DiagnosisCode::kMainGradMismatch, "MAIN_GRAD_MISMATCH"},
    {DiagnosisCode::kObjectiveNotInvariant, "OBJECTIVE_NOT_INVARIANT"},
    {DiagnosisCode::kObjectiveWeighting, "OBJECTIVE_WEIGHTING"},
    {DiagnosisCode::kFdUnreliable, "FD_UNRELIABLE"},
    {DiagnosisCode::kReplicaDivergence, "REPLICA_DIVERGENCE"},
    {DiagnosisCode::kRoutingDiffers, "ROUTING_DIFFERS"},
};

}  // namespace

const char* toString(DiagnosisCode code) {
  for (const auto& [value, name] : kNames)
    if (value == code) return name;
  return "";
}

const std::vector<DiagnosisCode>& allDiagnosisCodes() {
  static const std::vector<DiagnosisCode> codes = [] {
    std::vector<DiagnosisCode> all;
    for (const auto& entry : kNames) all.push_back(entry.first);
    return all;
  }();
  return codes;
}

std::vector<std::string> diagnosisCodeNames() {
  std::vector<std::string> names;
  for (const auto& entry : kNames) names.push_back(entry.second);
  return names;
}

std::optional<DiagnosisCode> parseDiagnosisCode(const std::string& name) {
  for (const auto& [value, text] : kNames)
    if (name == text) return value;
  return std::nullopt;
}

}  // namespace moe
