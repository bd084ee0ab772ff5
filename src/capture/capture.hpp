// Captures of a real training job (one safetensors file per rank, capture format v1, described in
// docs/capture-format.md): loading, enforcing the contract, and assembling each layer's global token
// set from the ranks' records. Torch-free, so `verify`, the fuzz targets and the sanitizer build need
// no LibTorch.
//
// Every violation of the contract throws InputError naming the file (CAPTURE_DIR/rank{R}.safetensors
// or the directory), the tensor or manifest key (a JSON pointer such as "/mesh/dp_size" or
// "/layer3.mb1.input") and what was expected. Nothing here allocates memory in proportion to a shape
// the file declares before checking that the file holds that many bytes.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "scenario/scenario.hpp"

namespace moe {

// The manifest's "mesh": this rank's coordinates and the sizes (every size >= 1, every coordinate in
// [0, size)). `dp` is the data-parallel index of the data the rank holds.
struct CaptureMesh {
  int dp = 0, dp_size = 1;
  int cp = 0, cp_size = 1;
  int pp = 0, pp_size = 1;
  int tp = 0, tp_size = 1;  // optional in the manifest (defaults 0 and 1)
  int ep = 0, ep_size = 1;  // optional in the manifest (defaults 0 and 1)
  int microbatches = 1;
};

// The manifest's "objective": the objective the job intends, with defaults filled in.
// The manifest's "objective": the router loss terms under the manifest's own key names (aux_scope is
// "aux_type", aux_coeff "coeff", z_coeff "z_loss_coeff", z_scope "z_loss_scope"). Required: aux_type,
// coeff (>= 0), top_k (1 <= top_k <= experts), score; group_weighting is kUniform or kTokens only.
struct CaptureObjective : RouterLossTerms {
  // The precision the job computed its aux math in; when the manifest leaves it out, the precision of
  // the gradient tensors (F64 -> float64, F32 -> float32, BF16 and F16 -> bfloat16 for tolerance
  // purposes; the coarsest over every rank's gradients when they differ). loadCapture fills it in;
  // compute_dtype_given says whether the manifest wrote it.
  DType compute_dtype = DType::kFloat32;
  bool compute_dtype_given = false;
};

struct CaptureManifest {
  int schema_version = 1;
  int rank = 0;
  int world_size = 1;
  CaptureMesh mesh;
  std::vector<int> layers;  // global layer indices this rank holds, ascending, distinct
  int seq_len = 1;
  CaptureObjective objective;
  bool router_inputs_detached = true;  // must be true
  double main_loss_scale = 0.0;        // must be 0
  std::string framework;
  std::string created_by;
};

// One token of a layer's global token set.
struct CaptureToken {
  std::int64_t sequence = 0;  // index in the global batch
  std::int64_t position = 0;  // in [0, seq_len)
  bool valid = true;
  int dp = 0;          // mesh.dp of the ranks that recorded it
  int microbatch = 0;  // m of the layer{l}.mb{m} tensors it came from
};

// Element type of a float tensor in a capture file.
enum class CaptureFloat : std::uint8_t { kF64, kF32, kBF16, kF16 };
const char* toString(CaptureFloat dtype);  // "F64", "F32", "BF16", "F16"

// One layer, assembled over every rank that holds it.
struct CaptureLayer {
  int layer = 0;               // global layer index
  int experts = 0, hidden = 0;
  std::vector<int> ranks;      // ranks holding the layer (in their manifest's `layers`), ascending
  std::vector<double> weight;  // [E, H] (nn.Linear layout, z = h W^T) of ranks.front(), as float64
  std::vector<double> expert_bias;  // [E], or empty when not recorded
  std::vector<std::vector<double>> grads;  // per entry of `ranks`: [E, H] gradient, as float64
  CaptureFloat grad_dtype = CaptureFloat::kF32;  // of ranks.front()'s gradient

  // The union of the ranks' rows, one entry per distinct (sequence, position), sorted by
  // (sequence, position). A token recorded by several ranks was checked to carry the same input
  // (4 ulps of its dtype), validity, (dp, microbatch) and top-k.
  std::vector<CaptureToken> tokens;
  // The job's own routing, [tokens.size(), top_k] expert indices, or empty when not recorded.
  std::vector<std::int64_t> topk;

  // Router-input row of each token, where it lies in its (memory-mapped) rank file: no float64 copy
  // of the inputs is ever made. readRows converts rows [begin, begin + count) of `tokens` to float64
  // into out[count * hidden].
  std::vector<const std::uint8_t*> row_data;
  std::vector<CaptureFloat> row_dtype;
  void readRows(std::int64_t begin, std::int64_t count, double* out) const;
};

struct Capture {
  std::string directory;
  int world_size = 1;
  CaptureManifest manifest;  // rank 0's; the parts every rank shares are checked equal
  std::vector<CaptureManifest> rank_manifests;  // one per rank, index = rank
  std::vector<CaptureLayer> layers;  // ascending global layer index
  std::uint64_t bytes_on_disk = 0;   // sum of the rank files' sizes

  // The mapped rank files; CaptureLayer::row_data points into them.
  std::vector<std::shared_ptr<const void>> mappings;
};

// Loads CAPTURE_DIR/rank{R}.safetensors for R = 0 .. world_size-1 and enforces every rule of the
// capture contract. Throws InputError (exit 2) on any violation.
Capture loadCapture(const std::string& directory);

}  // namespace moe
