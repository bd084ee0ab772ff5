// Pipeline schedules: the order in which one pipeline rank runs forward and backward passes of its
// microbatches. A schedule changes only the order of the work, never its arithmetic, so the gradient
// must not depend on it beyond rounding (tested).
#pragma once

#include <vector>

#include "scenario/scenario.hpp"

namespace moe {

struct PipelineAction {
  enum Kind { kForward, kBackward } kind;
  int microbatch;
  int virtual_stage;  // model chunk on this rank (0 unless interleaved)
};

// Actions of pipeline rank `stage` (0-based) of `pp`, for `microbatches` microbatches and
// `virtual_stages` model chunks per rank. Every (microbatch, chunk) gets exactly one forward before
// its one backward. gpipe: all forwards, then all backwards in reverse; 1f1b: pp-stage-1 warm-up
// forwards, then alternate, then cool-down (PipeDream-Flush, Megatron
// forward_backward_pipelining_without_interleaving); interleaved_1f1b: Megatron's
// forward_backward_pipelining_with_interleaving order (microbatches must be a multiple of pp).
std::vector<PipelineAction> pipelineSchedule(Schedule schedule, int pp, int stage, int microbatches,
                                             int virtual_stages);

}  // namespace moe
