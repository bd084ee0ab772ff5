// Pipeline schedules: every (microbatch, chunk) runs forward once before its backward, and the
// order matches the published schedules' structure.
#include <gtest/gtest.h>

#include <map>
#include <set>

#include "sim/schedule.hpp"

namespace moe {
namespace {

struct ScheduleCase {
  Schedule schedule;
  int pp, microbatches, virtual_stages;
};

class ScheduleTest : public ::testing::TestWithParam<ScheduleCase> {};

TEST_P(ScheduleTest, EveryForwardPrecedesItsBackwardExactlyOnce) {
  const ScheduleCase c = GetParam();
  for (int stage = 0; stage < c.pp; ++stage) {
    std::map<std::pair<int, int>, int> state;  // 0 none, 1 forward done, 2 backward done
    for (const PipelineAction& a : pipelineSchedule(c.schedule, c.pp, stage, c.microbatches, c.virtual_stages)) {
      int& s = state[{a.microbatch, a.virtual_stage}];
      if (a.kind == PipelineAction::kForward) {
        EXPECT_EQ(s, 0);
        s = 1;
      } else {
        EXPECT_EQ(s, 1);
        s = 2;
      }
    }
    EXPECT_EQ(state.size(), static_cast<size_t>(c.microbatches * c.virtual_stages));
    for (const auto& [key, s] : state) EXPECT_EQ(s, 2);
  }
}

INSTANTIATE_TEST_SUITE_P(
    Schedules, ScheduleTest,
    ::testing::Values(ScheduleCase{Schedule::kGPipe, 1, 1, 1}, ScheduleCase{Schedule::kGPipe, 3, 5, 1},
                      ScheduleCase{Schedule::kOneFOneB, 1, 4, 1}, ScheduleCase{Schedule::kOneFOneB, 4, 2, 1},
                      ScheduleCase{Schedule::kOneFOneB, 3, 7, 1},
                      ScheduleCase{Schedule::kInterleaved1F1B, 2, 4, 2},
                      ScheduleCase{Schedule::kInterleaved1F1B, 3, 6, 3}));

TEST(Schedule, OneFOneBWarmsUpWithPipelineDepthMinusStage) {
  // Stage 0 of 4 runs 3 warm-up forwards, the last stage none (PipeDream-Flush).
  const auto first = pipelineSchedule(Schedule::kOneFOneB, 4, 0, 8, 1);
  for (int i = 0; i < 4; ++i) EXPECT_EQ(first[i].kind, PipelineAction::kForward);
  EXPECT_EQ(first[4].kind, PipelineAction::kBackward);
  const auto last = pipelineSchedule(Schedule::kOneFOneB, 4, 3, 8, 1);
  EXPECT_EQ(last[0].kind, PipelineAction::kForward);
  EXPECT_EQ(last[1].kind, PipelineAction::kBackward);
}

}  // namespace
}  // namespace moe
