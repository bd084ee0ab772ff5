#include "app/check_run.hpp"

#include <chrono>
#include <cmath>

#include <fmt/format.h>

#include "app/tool_info.hpp"
#include "check/pipeline.hpp"
#include "common/errors.hpp"
#include "reference/reference.hpp"
#include "scenario/catalog.hpp"

namespace moe {
namespace {

double secondsSince(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

std::vector<double> flatten(const std::vector<std::vector<double>>& per_layer) {
  std::vector<double> all;
  for (const auto& v : per_layer) all.insert(all.end(), v.begin(), v.end());
  return all;
}

double dotProduct(const std::vector<double>& a, const std::vector<double>& b) {
  long double s = 0;
  for (size_t i = 0; i < a.size(); ++i) s += static_cast<long double>(a[i]) * b[i];
  return static_cast<double>(s);
}

MeshQuantities quantitiesOf(const Scenario& sc, const ProblemData& data) {
  MeshQuantities q;
  q.sizes = sc.mesh;
  q.micro_batch_size = sc.data.batch / (sc.mesh.dp * sc.mesh.microbatches);
  double tokens = 0;
  for (auto v : data.valid) tokens += v;
  q.tokens = tokens;
  return q;
}

// Whether the non-empty aux groups of the objective hold different numbers of tokens.
bool unequalAuxGroups(const ProblemData& data, const ObjectiveDefinition& objective) {
  const TokenGroups groups = weighGroups(assignGroups(data, objective), objective);
  std::int64_t first = -1;
  for (std::int64_t size : groups.aux_size) {
    if (size == 0) continue;
    if (first < 0) first = size;
    else if (size != first) return true;
  }
  return false;
}

MeshRequest requestFor(const Scenario& sc, const ProblemData& data, const RunKnobs& knobs) {
  MeshRequest r;
  r.scenario = &sc;
  r.data = &data;
  r.knobs = knobs;
  return r;
}

}  // namespace

CheckRunOutput runChecks(const Scenario& input, MeshBackend& backend, const CheckRunOptions& options) {
  const auto t_start = std::chrono::steady_clock::now();
  validateScenario(input);  // the preset must express every fault before any work is done
  // What runs is the resolved scenario: the preset's defaults filled in, its open bugs added when asked.
  const Scenario sc = resolveScenario(input);
  const PresetRecord& preset = presetRecord(sc.framework.preset);
  CheckRunOutput out;
  ReportContext& context = out.report.context;
  context.kind = ReportKind::kRun;
  context.tool = toolInfo();
  context.scenario = sc;
  if (sc.framework.open_bugs) context.open_bugs = openBugsFor(input);
  context.mesh = MeshSummary{sc.mesh, backend.name(), toString(sc.mesh.schedule)};
  ReportSummary& summary = out.report.summary;

  out.data = loadProblem(sc);
  out.phases.load_s = secondsSince(t_start);
  const ProblemData& data = out.data;
  const double rtol = sc.tolerance.rtol > 0 ? sc.tolerance.rtol : defaultRtol(sc.model.dtype);
  const MeshQuantities quantities = quantitiesOf(sc, data);

  // --- the reference: float64 finite differences of the intended objective.
  const ObjectiveDefinition objective = intendedObjective(sc);
  ReferenceOptions ref_options;
  ref_options.directional_checks = options.directional_checks;
  const ReferenceResult ref = computeReference(data, objective, ref_options);
  out.phases.reference = ref.phases;

  // --- the mesh: aux-only runs (main loss multiplied by 0, as Megatron's test does) at alpha and
  // 2 alpha, and a main-only control run.
  const double alpha = sc.aux.coeff, beta = sc.aux.z_loss_coeff;
  const bool has_aux = alpha != 0.0 || beta != 0.0;
  const auto t_mesh = std::chrono::steady_clock::now();
  const auto timedRun = [&](const char* label, const MeshRequest& request) {
    const auto t_run = std::chrono::steady_clock::now();
    MeshRunResult result = backend.run(request);
    out.phases.mesh_runs.emplace_back(label, secondsSince(t_run));
    return result;
  };
  const MeshRunResult aux_run = timedRun("aux", requestFor(sc, data, {0.0, alpha, beta, false}));
  std::optional<MeshRunResult> double_run;
  if (has_aux) double_run = timedRun("aux x2", requestFor(sc, data, {0.0, 2 * alpha, 2 * beta, false}));
  const MeshRunResult main_run = timedRun("main", requestFor(sc, data, {1.0, 0.0, 0.0, false}));
  if (options.capture) {
    MeshRequest request = requestFor(sc, data, {0.0, alpha, beta, /*detach_router_inputs=*/true});
    request.record_router_inputs = true;
    out.capture_run = timedRun("capture", request);
  }
  summary.timing.mesh_s = secondsSince(t_mesh);

  // --- the checks.
  const auto t_checks = std::chrono::steady_clock::now();
  std::vector<CheckResult>& checks = out.report.checks;
  const std::string fd_method = "reference: " + ref.method;
  const std::vector<std::vector<double>> aux_grads = aux_run.layerGradients(data.layers);
  for (int l = 0; l < data.layers; ++l) {
    const ReferenceLayer& rl = ref.layers[l];
    out.reference_aux_grad.push_back(rl.aux_grad);
    out.mesh_aux_grad.push_back(aux_grads[l]);
    checks.push_back(checkAuxGradient(l, aux_grads[l], rl.aux_grad, rtol, 10 * rl.aux_fd_error, quantities,
                                      preset.scale_knob, fd_method));
  }
  const std::vector<std::vector<double>> main_grads = main_run.layerGradients(data.layers);
  for (int l = 0; l < data.layers; ++l) {
    const ReferenceLayer& rl = ref.layers[l];
    checks.push_back(checkMainGradient(l, main_grads[l], rl.main_grad, rtol, 10 * rl.main_fd_error, fd_method));
  }
  // Every rank holding a router replica ends with the same gradient.
  for (int l = 0; l < data.layers; ++l) {
    std::vector<ReplicaGradient> replicas;
    for (const RankState& r : aux_run.ranks) {
      const auto it = r.router_grad.find(l);
      if (it != r.router_grad.end()) replicas.push_back({r.rank, &it->second});
    }
    checks.push_back(checkReplicas(l, replicas, rtol));
  }
  if (has_aux) {
    const std::vector<double> g1 = flatten(aux_grads), g2 = flatten(double_run->layerGradients(data.layers));
    checks.push_back(checkCoeffLinearity(g1, g2, rtol));
    for (size_t i = 0; i < ref.directional.size(); ++i) {
      const DirectionalDerivative& dd = ref.directional[i];
      checks.push_back(checkDirectional(static_cast<int>(i), dotProduct(g1, flatten(dd.direction)), dd.derivative,
                                        dd.fd_error, rtol));
    }
  }
  // A micro_batch-scoped objective depends on dp and M by definition.
  const bool per_group = sc.aux.type == AuxScope::kMicroBatch ||
                         (beta != 0 && sc.aux.z_loss_scope == ZLossScope::kMicroBatch);
  if (per_group && sc.mesh.dp * sc.mesh.microbatches > 1 && has_aux) {
    ObjectiveDefinition one_group = objective;
    one_group.mesh.dp = 1;
    one_group.mesh.microbatches = 1;
    const ObjectiveValue here = evaluateObjective(data, objective);
    const ObjectiveValue single = evaluateObjective(data, one_group);
    if (auto finding = findObjectiveNotInvariant(here.aux + here.z, single.aux + single.z))
      checks.push_back(*finding);
  }
  // The preset weighs groups by tokens without the scenario asking for it (the input left
  // group_weighting to the preset; the resolved scenario names the preset's choice), and the groups differ.
  if (alpha != 0.0 && input.aux.group_weighting == GroupWeighting::kPreset &&
      preset.group_weighting == GroupWeighting::kTokens && unequalAuxGroups(data, objective)) {
    ObjectiveDefinition uniform = objective;
    uniform.group_weighting = GroupWeighting::kUniform;
    ReferenceOptions aux_only = ref_options;
    aux_only.with_main = false;
    aux_only.directional_checks = 0;
    const ReferenceResult uniform_ref = computeReference(data, uniform, aux_only);
    std::vector<std::vector<double>> uniform_grads;
    for (const ReferenceLayer& rl : uniform_ref.layers) uniform_grads.push_back(rl.aux_grad);
    checks.push_back(findObjectiveWeighting(flatten(aux_grads), flatten(uniform_grads), rtol, preset.name));
  }
  if (auto finding = findRoutingMargins(ref.frozen_elements)) checks.push_back(*finding);

  out.phases.checks_s = secondsSince(t_checks);
  summary.reference = static_cast<const ReferenceSummary&>(ref);
  summary.timing.reference_s = ref.seconds;
  summary.verdict = verdictOf(checks);
  summary.expectation_met = expectationMet(sc.expect, summary.verdict, checks, summary.expectation_detail);
  summary.timing.total_s = secondsSince(t_start);
  return out;
}

}  // namespace moe
