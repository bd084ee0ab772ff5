#include "app/capture_export.hpp"

#include <fmt/format.h>
#include <unistd.h>

#include <filesystem>

#include "common/errors.hpp"
#include "common/interrupt.hpp"
#include "reference/objective.hpp"
#include "scenario/catalog.hpp"
#include "sim/mesh_layout.hpp"

namespace moe {
namespace {

namespace fs = std::filesystem;

// [H, E] row-major -> [E, H] row-major.
std::vector<double> transposed(const std::vector<double>& m, int rows, int cols) {
  std::vector<double> t(m.size());
  for (int r = 0; r < rows; ++r)
    for (int c = 0; c < cols; ++c) t[std::size_t(c) * rows + r] = m[std::size_t(r) * cols + c];
  return t;
}

}  // namespace

std::vector<CaptureRankRecord> captureOfMeshRun(const Scenario& scenario, const ProblemData& data,
                                                const MeshRunResult& run, const std::string& backend) {
  const Scenario sc = resolveScenario(scenario);
  const MeshLayout layout = MeshLayout::fromScenario(sc);
  const PresetRecord& preset = presetRecord(sc.framework.preset);
  const int H = data.hidden, E = data.experts;
  std::string faults;
  for (Fault f : sc.faults) faults += (faults.empty() ? "" : ",") + std::string(toString(f));
  std::vector<CaptureRankRecord> records;
  for (const RankState& state : run.ranks) {
    CaptureRankRecord r;
    CaptureManifest& m = r.manifest;
    m.rank = state.rank;
    m.world_size = static_cast<int>(layout.world());
    m.mesh.dp = state.coords.dp;
    m.mesh.dp_size = layout.dp;
    m.mesh.cp = state.coords.cp;
    m.mesh.cp_size = layout.cp;
    m.mesh.pp = state.coords.pp;
    m.mesh.pp_size = layout.pp;
    m.mesh.tp = state.coords.tp;
    m.mesh.tp_size = layout.tp;
    m.mesh.ep = layout.expertRank(state.coords, preset.expert_parallel == ExpertParallelCarve::kData);
    m.mesh.ep_size = layout.ep;
    m.mesh.microbatches = layout.microbatches;
    m.seq_len = layout.seq_len;
    static_cast<RouterLossTerms&>(m.objective) = intendedObjective(sc);  // weighting resolved: uniform or tokens
    m.objective.compute_dtype = sc.model.dtype;
    m.objective.compute_dtype_given = true;
    m.router_inputs_detached = true;
    m.main_loss_scale = 0.0;
    m.framework = fmt::format("moe-lbcheck {} mesh: preset {}{}", backend, preset.name,
                              faults.empty() ? "" : ", faults " + faults);
    m.created_by = "moe-lbcheck run --capture";
    for (const auto& [layer, grad] : state.router_grad) {
      m.layers.push_back(layer);
      CaptureLayerRecord l;
      l.layer = layer;
      l.experts = E;
      l.hidden = H;
      l.weight = transposed(data.router_weight[layer], H, E);
      l.grad = transposed(grad, H, E);
      for (const RouterInputRecord& in : state.inputs) {
        if (in.layer != layer) continue;
        l.microbatches.push_back(
            CaptureMicrobatchRecord{in.microbatch, in.rows, in.sequence, in.position, in.valid, in.topk});
      }
      r.layers.push_back(std::move(l));
    }
    r.weight_dtype = r.grad_dtype = r.bias_dtype = r.input_dtype = CaptureFloat::kF64;
    records.push_back(std::move(r));
  }
  return records;
}

void requireCaptureDirectoryFree(const std::string& directory) {
  std::error_code ec;
  if (!fs::exists(directory, ec)) return;
  if (!fs::is_directory(directory, ec))
    throw UsageError("--capture " + directory + ": exists and is not a directory");
  if (!fs::is_empty(directory, ec))
    throw UsageError("--capture " + directory + ": the directory is not empty; give a new or an empty directory");
}

void writeCaptureDirectory(const std::string& directory, const std::vector<CaptureRankRecord>& ranks) {
  requireCaptureDirectoryFree(directory);
  const fs::path target = fs::absolute(directory);
  const fs::path temp = target.parent_path() / ("." + target.filename().string() + ".tmp." + std::to_string(::getpid()));
  std::error_code ec;
  fs::remove_all(temp, ec);
  interrupt::TemporaryPath removed_if_interrupted(temp.string());  // until it is renamed into place
  try {
    writeCapture(temp.string(), ranks);
    if (fs::exists(target, ec)) fs::remove(target, ec);  // an empty directory (checked above)
    fs::rename(temp, target);
  } catch (const fs::filesystem_error& e) {
    fs::remove_all(temp, ec);
    throw RuntimeFailure("cannot write the capture " + directory + ": " + e.what());
  } catch (...) {
    fs::remove_all(temp, ec);
    throw;
  }
}

}  // namespace moe
