#include "sim/schedule.hpp"

#include <algorithm>

namespace moe {
namespace {

std::vector<PipelineAction> gpipe(int microbatches, int virtual_stages) {
  std::vector<PipelineAction> a;
  for (int v = 0; v < virtual_stages; ++v)
    for (int m = 0; m < microbatches; ++m) a.push_back({PipelineAction::kForward, m, v});
  for (int v = virtual_stages - 1; v >= 0; --v)
    for (int m = microbatches - 1; m >= 0; --m) a.push_back({PipelineAction::kBackward, m, v});
  return a;
}

// Megatron forward_backward_pipelining_without_interleaving: warm-up, steady 1F1B, cool-down.
std::vector<PipelineAction> oneFOneB(int pp, int stage, int microbatches) {
  std::vector<PipelineAction> a;
  const int warmup = std::min(pp - stage - 1, microbatches);
  int next_forward = 0, next_backward = 0;
  for (int i = 0; i < warmup; ++i) a.push_back({PipelineAction::kForward, next_forward++, 0});
  while (next_forward < microbatches) {
    a.push_back({PipelineAction::kForward, next_forward++, 0});
    a.push_back({PipelineAction::kBackward, next_backward++, 0});
  }
  while (next_backward < microbatches) a.push_back({PipelineAction::kBackward, next_backward++, 0});
  return a;
}

// Megatron forward_backward_pipelining_with_interleaving: virtual microbatch k of this rank maps to
// chunk (k / pp) % V and microbatch (k / (pp V)) * pp + k % pp; backward chunks run in reverse.
std::vector<PipelineAction> interleaved(int pp, int stage, int microbatches, int virtual_stages) {
  const int total = microbatches * virtual_stages;
  auto forwardAt = [&](int k) {
    const int chunk = (k / pp) % virtual_stages;
    const int mb = (k / (pp * virtual_stages)) * pp + k % pp;
    return PipelineAction{PipelineAction::kForward, mb, chunk};
  };
  auto backwardAt = [&](int k) {
    const int chunk = virtual_stages - 1 - (k / pp) % virtual_stages;
    const int mb = (k / (pp * virtual_stages)) * pp + k % pp;
    return PipelineAction{PipelineAction::kBackward, mb, chunk};
  };
  int warmup = (pp - stage - 1) * 2 + (virtual_stages - 1) * pp;
  warmup = std::min(warmup, total);
  std::vector<PipelineAction> a;
  int f = 0, b = 0;
  for (; f < warmup; ++f) a.push_back(forwardAt(f));
  while (f < total) {
    a.push_back(forwardAt(f++));
    a.push_back(backwardAt(b++));
  }
  while (b < total) a.push_back(backwardAt(b++));
  return a;
}

}  // namespace

std::vector<PipelineAction> pipelineSchedule(Schedule schedule, int pp, int stage, int microbatches,
                                             int virtual_stages) {
  switch (schedule) {
    case Schedule::kGPipe: return gpipe(microbatches, virtual_stages);
    case Schedule::kOneFOneB:
      if (virtual_stages == 1) return oneFOneB(pp, stage, microbatches);
      return interleaved(pp, stage, microbatches, virtual_stages);
    case Schedule::kInterleaved1F1B: return interleaved(pp, stage, microbatches, virtual_stages);
  }
  return {};
}

}  // namespace moe
