// The diagnosis codes a check can carry (the report's `diagnosis.code`, a scenario's
// `expect.diagnosis`, `verify --expect diagnosis=`). One table: the enumerator and its JSON name.
#pragma once

#include <optional>
#include <string>
#include <vector>

namespace moe {

enum class DiagnosisCode {
  kNone,                   // nothing to report
  kAuxGradMissing,         // the mesh's aux gradient is zero
  kAuxGradScaled,          // parallel to the reference, scaled by a factor
  kAuxGradDirection,       // a different direction: the mesh differentiates another objective
  kAuxCoeffNonlinear,      // doubling alpha does not double the gradient
  kMainGradMismatch,       // the main-loss control differs: the mesh itself is off
  kObjectiveNotInvariant,  // informational: a micro_batch objective depends on dp and M
  kObjectiveWeighting,     // informational: groups weighted by tokens, not uniformly
  kFdUnreliable,           // informational: near-ties forced frozen routing
  kReplicaDivergence,      // ranks that hold the same router replica end with different gradients
  kRoutingDiffers,         // informational (verify): recorded top-k differs from the scores' top-k
};

// "AUX_GRAD_MISSING", ...; "" for kNone.
const char* toString(DiagnosisCode code);
// Every code except kNone, in declaration order (the JSON Schema enumerates the same names).
const std::vector<DiagnosisCode>& allDiagnosisCodes();
std::vector<std::string> diagnosisCodeNames();
// The code of a name, or nullopt.
std::optional<DiagnosisCode> parseDiagnosisCode(const std::string& name);

}  // namespace moe
