// The small reference's huge-page region (src/reference/arena.hpp): which blocks it hands out, on
// which thread, and that a reference computed with it equals one computed without it.
#include <gtest/gtest.h>

#include <cstdint>
#include <thread>

#include "../reference_problem.hpp"
#include "data/problem.hpp"
#include "reference/layer_cache.hpp"
#include "reference/reference.hpp"

namespace moe::reference {
namespace {

TEST(ReferenceArena, NoRegionForNothingOrForLargeRuns) {
  EXPECT_FALSE(ReferenceArenaScope(0).active());
  EXPECT_FALSE(ReferenceArenaScope(ReferenceArenaScope::kMaxBytes + 1).active());
  EXPECT_EQ(takeFromReferenceArena(64), nullptr);
}

TEST(ReferenceArena, BuffersComeFromTheRegionUntilItIsFull) {
  const ReferenceArenaScope scope(std::size_t(1) << 20);  // rounded up to one 2 MiB page
  ASSERT_TRUE(scope.active());
  FilledLater a(1000), b(1000);
  EXPECT_TRUE(inReferenceArena(a.data()));
  EXPECT_TRUE(inReferenceArena(b.data()));
  EXPECT_EQ(reinterpret_cast<std::uintptr_t>(a.data()) % 64, 0u);  // cache-line aligned
  EXPECT_GE(b.data(), a.data() + 1000);                            // no overlap
  FilledLater too_big(std::size_t(3) << 20 >> 3);                  // 3 MiB: more than is left
  EXPECT_FALSE(inReferenceArena(too_big.data()));
  a.assign(1000, 2.5);  // written and read back like any vector
  EXPECT_EQ(a[999], 2.5);
}

TEST(ReferenceArena, OnlyTheScopesThreadTakesAndASecondScopeIsInactive) {
  const ReferenceArenaScope scope(std::size_t(1) << 20);
  ASSERT_TRUE(scope.active());
  EXPECT_FALSE(ReferenceArenaScope(std::size_t(1) << 20).active());
  bool worker_in_region = true;
  std::thread worker([&] {
    FilledLater v(100);
    worker_in_region = inReferenceArena(v.data());
  });
  worker.join();
  EXPECT_FALSE(worker_in_region);
}

TEST(ReferenceArena, ReferenceIsTheSameWithAndWithoutTheRegion) {
  // The region only changes where the buffers live: a reference computed while another scope holds
  // the region (so that its own is inactive) gives bitwise the same gradients.
  const Scenario sc = resolveScenario(test::problemScenario(11, 2, 32, 16, 8, 8, 2, {}));
  const ProblemData data = generateProblem(sc);
  const ObjectiveDefinition objective = intendedObjective(sc);
  const ReferenceResult with_region = computeReference(data, objective);
  ReferenceResult without_region;
  {
    const ReferenceArenaScope holder(std::size_t(1) << 20);
    ASSERT_TRUE(holder.active());
    without_region = computeReference(data, objective);
  }
  ASSERT_EQ(with_region.layers.size(), without_region.layers.size());
  for (std::size_t l = 0; l < with_region.layers.size(); ++l) {
    EXPECT_EQ(with_region.layers[l].aux_grad, without_region.layers[l].aux_grad);
    EXPECT_EQ(with_region.layers[l].main_grad, without_region.layers[l].main_grad);
  }
}

}  // namespace
}  // namespace moe::reference
