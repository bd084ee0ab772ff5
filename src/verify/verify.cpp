#include "verify/verify.hpp"

#include <algorithm>
#include <chrono>
#include <map>
#include <set>
#include <sstream>

#include <fmt/format.h>

#include "check/pipeline.hpp"
#include "common/errors.hpp"
#include "reference/layer_local.hpp"

namespace moe {
namespace {

double secondsSince(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

double rtolOfGradient(CaptureFloat dtype) {
  switch (dtype) {
    case CaptureFloat::kF64: return defaultRtol(DType::kFloat64);
    case CaptureFloat::kF32: return defaultRtol(DType::kFloat32);
    case CaptureFloat::kF16: return 1e-2;  // 11 significant bits (eps 9.8e-4); ~10 eps accumulate
    case CaptureFloat::kBF16: return defaultRtol(DType::kBFloat16);
  }
  return defaultRtol(DType::kFloat32);
}

// The rows of one capture layer, read through the capture's own row blocks.
class CaptureRows : public RowReader {
 public:
  explicit CaptureRows(const CaptureLayer& layer) : layer_(layer) {}
  void read(std::int64_t begin, std::int64_t count, double* out) const override {
    layer_.readRows(begin, count, out);
  }

 private:
  const CaptureLayer& layer_;
};

// The aux and z-loss groups of a layer's tokens: micro_batch groups are the (mesh.dp, microbatch)
// pairs, sequence groups the sequence indices, global_batch one group; padding is left out of both
// token sets when exclude_padding.
GroupAssignment groupsOf(const CaptureLayer& layer, const CaptureManifest& manifest) {
  const CaptureObjective& o = manifest.objective;
  const int M = manifest.mesh.microbatches;
  const std::size_t n = layer.tokens.size();
  GroupAssignment g;
  g.aux_group.assign(n, -1);
  g.z_group.assign(n, -1);
  g.main_group.assign(n, -1);
  std::map<std::int64_t, int> sequence_group;
  for (const CaptureToken& t : layer.tokens)
    sequence_group.emplace(t.sequence, static_cast<int>(sequence_group.size()));
  const int microbatch_groups = manifest.mesh.dp_size * M;
  switch (o.aux_scope) {
    case AuxScope::kMicroBatch: g.aux_groups = microbatch_groups; break;
    case AuxScope::kSequence: g.aux_groups = static_cast<int>(sequence_group.size()); break;
    case AuxScope::kGlobalBatch: g.aux_groups = 1; break;
  }
  g.z_groups = o.z_scope == ZLossScope::kMicroBatch ? microbatch_groups : 1;
  for (std::size_t i = 0; i < n; ++i) {
    const CaptureToken& t = layer.tokens[i];
    if (o.exclude_padding && !t.valid) continue;
    const int microbatch_group = t.dp * M + t.microbatch;
    switch (o.aux_scope) {
      case AuxScope::kMicroBatch: g.aux_group[i] = microbatch_group; break;
      case AuxScope::kSequence: g.aux_group[i] = sequence_group.at(t.sequence); break;
      case AuxScope::kGlobalBatch: g.aux_group[i] = 0; break;
    }
    g.z_group[i] = o.z_scope == ZLossScope::kMicroBatch ? microbatch_group : 0;
  }
  return g;
}

ObjectiveDefinition objectiveOf(const CaptureObjective& o) {
  ObjectiveDefinition d;
  static_cast<RouterLossTerms&>(d) = o;
  return d;
}

// The quantities a scale is attributed to: the capture's sizes, micro-batch size (sequences per
// (replica, microbatch) when every group holds the same number), valid tokens and world size.
MeshQuantities quantitiesOf(const Capture& capture) {
  const CaptureMesh& m = capture.manifest.mesh;
  MeshQuantities q;
  q.sizes = MeshSizes{/*tp*/ m.tp_size, /*cp*/ m.cp_size, /*dp*/ m.dp_size,
                      /*pp*/ m.pp_size, /*ep*/ m.ep_size, /*microbatches*/ m.microbatches};
  q.attribute_world = true;
  if (capture.layers.empty()) return q;
  const CaptureLayer& layer = capture.layers.front();
  std::map<std::pair<int, int>, std::set<std::int64_t>> sequences;
  double tokens = 0;
  for (const CaptureToken& t : layer.tokens) {
    sequences[{t.dp, t.microbatch}].insert(t.sequence);
    if (t.valid) tokens += 1;
  }
  std::set<std::size_t> sizes;
  for (const auto& [group, members] : sequences) sizes.insert(members.size());
  q.micro_batch_size = sizes.size() == 1 ? static_cast<int>(*sizes.begin()) : 1;
  q.tokens = tokens > 0 ? tokens : 1;
  return q;
}

constexpr const char* kScaleKnob =
    "the aux loss's backward scale (the autoscaler's main_loss_backward_scale, or the factor the aux term is "
    "multiplied by before backward)";

}  // namespace

double defaultCaptureRtol(const Capture& capture) {
  double rtol = defaultRtol(capture.manifest.objective.compute_dtype);
  for (const CaptureLayer& layer : capture.layers) rtol = std::max(rtol, rtolOfGradient(layer.grad_dtype));
  return rtol;
}

Report verifyCapture(const Capture& capture, const VerifyOptions& options, const ToolInfo& tool,
                     double load_seconds) {
  const auto t0 = std::chrono::steady_clock::now();
  const CaptureManifest& manifest = capture.manifest;
  Report report;
  ReportContext& context = report.context;
  context.kind = ReportKind::kVerify;
  context.tool = tool;
  CaptureSummary summary;
  summary.directory = capture.directory;
  summary.manifest = manifest;
  for (const CaptureLayer& layer : capture.layers) summary.layers.push_back(layer.layer);
  const MeshQuantities quantities = quantitiesOf(capture);
  summary.tokens = static_cast<std::int64_t>(capture.layers.empty() ? 0 : quantities.tokens);
  context.capture = summary;

  const double rtol = options.rtol > 0 ? options.rtol : defaultCaptureRtol(capture);
  const ObjectiveDefinition objective = objectiveOf(manifest.objective);
  ReferenceSummary reference;
  double reference_seconds = 0.0;
  std::vector<CheckResult> replica_checks, routing_findings;
  for (const CaptureLayer& layer : capture.layers) {
    const CaptureRows rows(layer);
    LayerLocalInputs in;
    in.rows = static_cast<std::int64_t>(layer.tokens.size());
    in.hidden = layer.hidden;
    in.experts = layer.experts;
    in.inputs = &rows;
    in.weight = &layer.weight;
    in.expert_bias = layer.expert_bias;
    in.topk = layer.topk;
    in.groups = groupsOf(layer, manifest);
    const LayerLocalResult ref = computeLayerLocalReference(in, objective, options.reference);
    reference_seconds += ref.seconds;
    reference.method = ref.method;
    reference.max_step = std::max(reference.max_step, ref.max_step);
    reference.fd_error_estimate = std::max(reference.fd_error_estimate, ref.fd_error);
    reference.near_ties += ref.near_ties;
    reference.frozen_elements += ref.frozen_elements;
    reference.empty_groups = ref.empty_groups;
    reference.aux_value += ref.aux_value;
    reference.z_value += ref.z_value;

    report.checks.push_back(checkAuxGradient(layer.layer, layer.grads.front(), ref.grad, rtol, 10 * ref.fd_error,
                                             quantities, kScaleKnob,
                                             fmt::format("rank {}'s gradient; reference: {}", layer.ranks.front(),
                                                         ref.method)));
    std::vector<ReplicaGradient> replicas;
    for (std::size_t i = 0; i < layer.ranks.size(); ++i) replicas.push_back({layer.ranks[i], &layer.grads[i]});
    replica_checks.push_back(checkReplicas(layer.layer, replicas, rtol));
    CheckResult routing = findRoutingDifferences(layer.layer, ref.routing_differs, in.rows);
    if (layer.topk.empty())
      routing.method = "no routing recorded: the reference routes every row by the top-k of its recorded scores";
    routing_findings.push_back(routing);
  }
  report.checks.insert(report.checks.end(), replica_checks.begin(), replica_checks.end());
  report.checks.insert(report.checks.end(), routing_findings.begin(), routing_findings.end());
  if (auto finding = findRoutingMargins(reference.frozen_elements)) report.checks.push_back(*finding);
  reference.seconds = reference_seconds;

  ReportSummary& s = report.summary;
  s.reference = reference;
  s.timing.reference_s = reference_seconds;
  s.timing.load_s = load_seconds;
  s.verdict = verdictOf(report.checks);
  s.expectation_met = expectationMet(options.expect, s.verdict, report.checks, s.expectation_detail);
  s.timing.total_s = load_seconds + secondsSince(t0);
  return report;
}

Report verifyCaptureDirectory(const std::string& directory, const VerifyOptions& options, const ToolInfo& tool) {
  const auto t0 = std::chrono::steady_clock::now();
  const Capture capture = loadCapture(directory);
  return verifyCapture(capture, options, tool, secondsSince(t0));
}

Expectation parseExpectation(const std::string& text) {
  Expectation e;
  bool verdict_given = false;
  std::stringstream in(text);
  std::string item;
  while (std::getline(in, item, ',')) {
    if (item.empty()) continue;
    const auto eq = item.find('=');
    if (eq == std::string::npos)
      throw UsageError("--expect: '" + item + "': expected key=value (verdict, diagnosis, factor)");
    const std::string key = item.substr(0, eq), value = item.substr(eq + 1);
    if (key == "verdict") {
      const std::optional<Verdict> v = verdictNamed(value);
      if (!v) throw UsageError("--expect: verdict=" + value + ": expected pass or fail");
      e.verdict = *v;
      verdict_given = true;
    } else if (key == "diagnosis") {
      const std::optional<DiagnosisCode> code = parseDiagnosisCode(value);
      if (!code) {
        std::string names;
        for (const std::string& n : diagnosisCodeNames()) names += (names.empty() ? "" : ", ") + n;
        throw UsageError("--expect: diagnosis=" + value + ": expected one of " + names);
      }
      e.diagnosis = *code;
    } else if (key == "factor") {
      e.factor = value;
    } else {
      throw UsageError("--expect: unknown key '" + key + "' (expected verdict, diagnosis, factor)");
    }
  }
  if (!verdict_given) {
    // A diagnosis or factor that only a failing check carries means a failing run.
    const bool informational = e.diagnosis == DiagnosisCode::kRoutingDiffers ||
                               e.diagnosis == DiagnosisCode::kFdUnreliable ||
                               e.diagnosis == DiagnosisCode::kObjectiveNotInvariant ||
                               e.diagnosis == DiagnosisCode::kObjectiveWeighting;
    if ((e.diagnosis != DiagnosisCode::kNone && !informational) || !e.factor.empty()) e.verdict = Verdict::kFail;
  }
  return e;
}

}  // namespace moe
