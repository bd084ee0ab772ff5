// Emulated meshes: collectives, every preset on a grid of meshes, faults on two meshes, schedule and
// CP-layout independence, layout invariance of the sequence and global objectives.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <set>
#include <thread>
#include <tuple>

#include "app/check_run.hpp"
#include "app/selftest.hpp"
#include "check/compare.hpp"
#include "common/errors.hpp"
#include "common/progress.hpp"
#include "scenario/catalog.hpp"
#include "sim/emulated_communicator.hpp"
#include "sim/emulated_backend.hpp"
#include "../reference_problem.hpp"

namespace moe {
namespace {

Scenario smallScenario() {
  Scenario sc = test::problemScenario(5, /*B=*/12, /*S=*/8, /*H=*/12, /*E=*/5, /*F=*/6, /*L=*/4,
                                      {8, 6, 8, 3, 8, 8, 5, 8, 7, 8, 2, 8});
  sc.name = "grid";
  sc.model.top_k = 2;
  sc.aux.coeff = 0.01;
  sc.aux.z_loss_coeff = 0.001;
  return sc;
}

std::vector<double> flat(const std::vector<std::vector<double>>& per_layer) {
  std::vector<double> all;
  for (const auto& v : per_layer) all.insert(all.end(), v.begin(), v.end());
  return all;
}

// The aux-only gradient (main loss x 0) of every layer, from the lowest rank holding it.
std::vector<std::vector<double>> auxGradient(const Scenario& sc) {
  const ProblemData data = generateProblem(sc);
  MeshRequest request;
  request.scenario = &sc;
  request.data = &data;
  request.knobs = {0.0, sc.aux.coeff, sc.aux.z_loss_coeff, false};
  EmulatedBackend backend;
  return backend.run(request).layerGradients(sc.model.layers);
}

Report checksOf(const Scenario& sc) {
  EmulatedBackend backend;
  return runChecks(sc, backend).report;
}

double relativeDifference(const std::vector<double>& a, const std::vector<double>& b) {
  return compareVectors("diff", a, b, 0.0, 0.0).max_rel_err;
}

TEST(EmulatedCommunicator, AllReduceSumsOverEachGroupInRankOrder) {
  MeshLayout layout;
  layout.dp = 2;
  layout.pp = 2;
  layout.cp = 3;
  EmulatedWorld world(layout);
  std::vector<std::array<double, 3>> got(layout.world());
  std::vector<std::thread> threads;
  for (int r = 0; r < layout.world(); ++r)
    threads.emplace_back([&, r] {
      EmulatedCommunicator comm(world, r);
      at::Tensor t = torch::full({1}, double(r + 1), at::kDouble);
      at::Tensor cp = t.clone(), dp = t.clone(), dpcp = t.clone();
      comm.allReduceSum(cp, CommGroup::kContext);
      comm.allReduceSum(dp, CommGroup::kDataParallel);
      comm.allReduceSum(dpcp, CommGroup::kDataContext);
      got[r] = {cp.item<double>(), dp.item<double>(), dpcp.item<double>()};
    });
  for (auto& t : threads) t.join();
  for (int r = 0; r < layout.world(); ++r) {
    double cp = 0, dp = 0, dpcp = 0;
    for (int m : layout.contextGroup(r)) cp += m + 1;
    for (int m : layout.dataParallelGroup(r)) dp += m + 1;
    for (int m : layout.dataContextGroup(r)) dpcp += m + 1;
    EXPECT_EQ(got[r][0], cp) << "rank " << r;
    EXPECT_EQ(got[r][1], dp) << "rank " << r;
    EXPECT_EQ(got[r][2], dpcp) << "rank " << r;
  }
}

TEST(EmulatedCommunicator, MissingPeerTimesOutWithRankAndOperation) {
  MeshLayout layout;
  layout.dp = 2;
  EmulatedWorld world(layout, EmulatedOptions{std::chrono::milliseconds(200)});
  EmulatedCommunicator comm(world, 0);
  at::Tensor t = torch::ones({1}, at::kDouble);
  try {
    comm.allReduceSum(t, CommGroup::kDataParallel);
    FAIL() << "expected a time-out";
  } catch (const RuntimeFailure& e) {
    EXPECT_NE(std::string(e.what()).find("emulated rank 0 allReduceSum(dp group)"), std::string::npos)
        << e.what();
    EXPECT_EQ(e.code(), ExitCode::kRuntimeFailure);
  }
}

// A peer that arrives long after the time-out, while the process keeps progressing (thousands of ranks
// sharing a few compute slots), is late, not hung: the wait goes on.
TEST(EmulatedCommunicator, LatePeerWhileOthersProgressIsNotATimeout) {
  MeshLayout layout;
  layout.dp = 2;
  EmulatedWorld world(layout, EmulatedOptions{std::chrono::milliseconds(200)});
  std::thread late([&] {
    for (int i = 0; i < 10; ++i) {  // 5 time-outs' worth of work
      std::this_thread::sleep_for(std::chrono::milliseconds(100));
      progress::advance();
    }
    EmulatedCommunicator comm(world, 1);
    at::Tensor t = torch::full({1}, 2.0, at::kDouble);
    comm.allReduceSum(t, CommGroup::kDataParallel);
  });
  EmulatedCommunicator comm(world, 0);
  at::Tensor t = torch::ones({1}, at::kDouble);
  EXPECT_NO_THROW(comm.allReduceSum(t, CommGroup::kDataParallel));
  late.join();
  EXPECT_EQ(t.item<double>(), 3.0);
}

struct GridMesh {
  int dp, pp, cp, microbatches;
};

class PresetGrid : public ::testing::TestWithParam<std::tuple<Preset, GridMesh>> {};

TEST_P(PresetGrid, EveryPresetPassesOnEveryMeshWithoutFaults) {
  const auto& [preset, m] = GetParam();
  Scenario sc = smallScenario();
  sc.framework.preset = preset;
  sc.mesh.dp = m.dp;
  sc.mesh.pp = m.pp;
  sc.mesh.cp = m.cp;
  sc.mesh.microbatches = m.microbatches;
  for (AuxScope scope : {AuxScope::kMicroBatch, AuxScope::kGlobalBatch}) {
    sc.aux.type = scope;
    validateScenario(sc);
    const Report r = checksOf(sc);
    for (const CheckResult& c : r.checks)
      EXPECT_TRUE(c.ok || c.informational)
          << toString(preset) << " " << toString(scope) << " dp=" << m.dp << " pp=" << m.pp << " cp=" << m.cp
          << " M=" << m.microbatches << ": " << c.name << " scale " << c.scale << " cosine " << c.cosine
          << " " << toString(c.diagnosis.code) << " " << c.diagnosis.factor;
    EXPECT_EQ(r.summary.verdict, Verdict::kPass);
  }
}

std::vector<Preset> allPresets() {
  std::vector<Preset> n;
  for (const auto& p : presetCatalog()) n.push_back(p.id);
  return n;
}

INSTANTIATE_TEST_SUITE_P(
    Meshes, PresetGrid,
    ::testing::Combine(::testing::ValuesIn(allPresets()),
                       ::testing::Values(GridMesh{1, 1, 1, 1}, GridMesh{3, 1, 1, 4}, GridMesh{1, 2, 2, 3},
                                         GridMesh{2, 2, 2, 2}, GridMesh{3, 1, 2, 2})),
    [](const auto& info) {
      const GridMesh& m = std::get<1>(info.param);
      return std::string(toString(std::get<0>(info.param))) + "_dp" + std::to_string(m.dp) + "pp" + std::to_string(m.pp) + "cp" +
             std::to_string(m.cp) + "M" + std::to_string(m.microbatches);
    });

// Every fault is flagged with its signature on a second mesh too (dp and M swapped: dp=5, M=3).
// A case whose selftest mesh has one micro-batch keeps it: seq_aux_mean_valid_length needs two or more
// sequences per micro-batch (with one, the mean valid length is the sequence's own).
TEST(FaultsOnSecondMesh, EachFaultKeepsItsSignature) {
  for (SelftestCase c : selftestCases()) {
    for (Scenario* sc : {&c.buggy, &c.fixed}) {
      const bool one_micro_batch = sc->mesh.microbatches == 1;
      if (sc->mesh.dp == 3) sc->mesh.dp = 5, sc->mesh.microbatches = one_micro_batch ? 1 : 3;
      else sc->mesh.microbatches = 3;  // seq_aux_missing_mbs: dp=1, M=3 -> micro-batch size 5
      validateScenario(*sc);
    }
    const Report buggy = checksOf(c.buggy);
    EXPECT_TRUE(buggy.summary.expectation_met) << toString(c.fault) << ": " << buggy.summary.expectation_detail;
    const Report fixed = checksOf(c.fixed);
    EXPECT_TRUE(fixed.summary.expectation_met) << toString(c.fault) << " fixed twin: " << fixed.summary.expectation_detail;
  }
}

TEST(Schedules, GradientDoesNotDependOnThePipelineSchedule) {
  Scenario sc = smallScenario();
  sc.mesh.pp = 2;
  sc.mesh.microbatches = 4;
  sc.mesh.schedule = Schedule::kGPipe;
  const std::vector<double> gpipe = flat(auxGradient(sc));
  sc.mesh.schedule = Schedule::kOneFOneB;
  const std::vector<double> one_f_one_b = flat(auxGradient(sc));
  sc.mesh.schedule = Schedule::kInterleaved1F1B;
  sc.mesh.virtual_stages = 2;
  validateScenario(sc);
  const std::vector<double> interleaved = flat(auxGradient(sc));
  EXPECT_LE(relativeDifference(one_f_one_b, gpipe), 1e-13);
  EXPECT_LE(relativeDifference(interleaved, gpipe), 1e-13);
  EXPECT_GT(compareVectors("g", gpipe, gpipe, 0, 0).elements, 0);
}

TEST(ContextParallel, ZigzagEqualsContiguous) {
  Scenario sc = smallScenario();
  sc.mesh.cp = 2;
  sc.mesh.dp = 2;
  const std::vector<double> contiguous = flat(auxGradient(sc));
  sc.mesh.cp_layout = CpLayout::kZigzag;
  validateScenario(sc);
  const std::vector<double> zigzag = flat(auxGradient(sc));
  EXPECT_LE(relativeDifference(zigzag, contiguous), 1e-13);
}

TEST(Invariance, SequenceAndGlobalObjectivesDoNotDependOnTheLayout) {
  for (AuxScope scope : {AuxScope::kSequence, AuxScope::kGlobalBatch}) {
    Scenario sc = smallScenario();
    sc.aux.type = scope;
    sc.aux.z_loss_coeff = 0.0;
    sc.data.valid_lengths.assign(sc.data.batch, sc.data.seq_len);  // sequence mean over all sequences
    const std::vector<double> single = flat(auxGradient(sc));
    sc.mesh.dp = 3;
    sc.mesh.microbatches = 2;
    sc.mesh.cp = 2;
    sc.mesh.pp = 2;
    validateScenario(sc);
    const std::vector<double> mesh = flat(auxGradient(sc));
    EXPECT_LE(relativeDifference(mesh, single), 1e-13) << toString(scope);
  }
}

TEST(Invariance, MicroBatchObjectiveIsReportedAsNotInvariant) {
  Scenario sc = smallScenario();
  sc.mesh.dp = 3;
  sc.mesh.microbatches = 2;
  const Report r = checksOf(sc);
  bool found = false;
  for (const CheckResult& c : r.checks) found |= c.diagnosis.code == DiagnosisCode::kObjectiveNotInvariant;
  EXPECT_TRUE(found);
  EXPECT_EQ(r.summary.verdict, Verdict::kPass);
}

TEST(Precision, Float32MeshPassesWithItsDerivedTolerance) {
  Scenario sc = smallScenario();
  sc.model.dtype = DType::kFloat32;
  sc.mesh.dp = 2;
  sc.mesh.cp = 2;
  const Report r = checksOf(sc);
  EXPECT_EQ(r.summary.verdict, Verdict::kPass);
  for (const CheckResult& c : r.checks)
    if (c.name == "aux_grad/layer0/router_weight") {
      EXPECT_EQ(c.rtol, 1e-4);
      EXPECT_GT(c.max_rel_err, 1e-12);  // float32 arithmetic really happened
    }
}

}  // namespace
}  // namespace moe

// ------------------------------------------------------------------------------------------------
// TP / SP / EP: every preset passes on a covering array of the axes (every pair of axis values that
// the preset allows appears in at least one layout), with uneven padding and z-loss.

namespace moe {
namespace {

struct Axes {
  int tp, sp, ep, dp, cp, microbatches, pp;  // sp: 0 = the preset's default, 1 = on, 2 = off
  AuxScope scope;
};

// The grid's scenario: smallScenario's padding and losses, 8 experts (so that ep can be 2, 4 or 8).
Scenario gridScenario(Preset preset, const Axes& a) {
  Scenario sc = smallScenario();
  sc.name = "tp-grid";
  sc.seed = 9;
  sc.model.experts = 8;
  sc.model.ffn = 8;
  sc.aux.type = a.scope;
  sc.framework.preset = preset;
  sc.mesh.tp = a.tp;
  sc.mesh.ep = a.ep;
  sc.mesh.dp = a.dp;
  sc.mesh.cp = a.cp;
  sc.mesh.pp = a.pp;
  sc.mesh.microbatches = a.microbatches;
  if (a.sp == 1) sc.mesh.sequence_parallel = true;
  if (a.sp == 2) sc.mesh.sequence_parallel = false;
  return sc;
}

std::vector<int> values(const Axes& a) {
  return {a.tp, a.sp, a.ep, a.dp, a.cp, a.microbatches, a.pp, static_cast<int>(a.scope)};
}

// A greedy pairwise covering array over the layouts the preset accepts: rows are added until every
// pair of (axis, value) that occurs in some valid layout occurs in a chosen one.
std::vector<Axes> coveringArray(Preset preset) {
  std::vector<Axes> valid;
  for (int tp : {1, 2, 4})
    for (int sp : {0, 1, 2})
      for (int ep : {1, 2, 4})
        for (int dp : {1, 2})
          for (int cp : {1, 2})
            for (int m : {1, 2})
              for (int pp : {1, 2})
                for (AuxScope scope : {AuxScope::kMicroBatch, AuxScope::kGlobalBatch}) {
                  const Axes a{tp, sp, ep, dp, cp, m, pp, scope};
                  try {
                    validateScenario(gridScenario(preset, a));
                    valid.push_back(a);
                  } catch (const InputError&) {
                  }
                }
  using Pair = std::tuple<int, int, int, int>;  // (axis i, value, axis j, value)
  auto pairsOf = [](const Axes& a) {
    std::set<Pair> pairs;
    const std::vector<int> v = values(a);
    for (size_t i = 0; i < v.size(); ++i)
      for (size_t j = i + 1; j < v.size(); ++j) pairs.insert({int(i), v[i], int(j), v[j]});
    return pairs;
  };
  std::set<Pair> uncovered;
  for (const Axes& a : valid)
    for (const Pair& p : pairsOf(a)) uncovered.insert(p);
  std::vector<Axes> rows;
  while (!uncovered.empty()) {
    size_t best = 0, best_gain = 0;
    for (size_t i = 0; i < valid.size(); ++i) {
      size_t gain = 0;
      for (const Pair& p : pairsOf(valid[i])) gain += uncovered.count(p);
      if (gain > best_gain) best_gain = gain, best = i;
    }
    for (const Pair& p : pairsOf(valid[best])) uncovered.erase(p);
    rows.push_back(valid[best]);
  }
  return rows;
}

class TensorParallelGrid : public ::testing::TestWithParam<Preset> {};

TEST_P(TensorParallelGrid, EveryPresetPassesOnACoveringArrayOfTpSpEpLayouts) {
  const Preset preset = GetParam();
  const std::vector<Axes> rows = coveringArray(preset);
  if (preset == Preset::kHfTrainer) {
    for (const Axes& a : rows) EXPECT_TRUE(a.tp == 1 && a.ep == 1) << "hf_trainer refuses tp > 1 and ep > 1";
  } else {
    bool tp_seen = false, ep_seen = false;
    for (const Axes& a : rows) tp_seen |= a.tp == 4, ep_seen |= a.ep > 1;
    EXPECT_TRUE(tp_seen && ep_seen) << "the array covers tp 4 and an ep > 1";
  }
  std::printf("[tp grid] %s: %zu layouts\n", toString(preset), rows.size());
  for (const Axes& a : rows) {
    const Scenario sc = gridScenario(preset, a);
    const Report r = checksOf(sc);
    for (const CheckResult& c : r.checks)
      EXPECT_TRUE(c.ok || c.informational)
          << toString(preset) << " " << toString(a.scope) << " tp=" << a.tp << " sp=" << a.sp << " ep=" << a.ep
          << " dp=" << a.dp << " cp=" << a.cp << " M=" << a.microbatches << " pp=" << a.pp << ": " << c.name
          << " scale " << c.scale << " cosine " << c.cosine << " " << toString(c.diagnosis.code) << " "
          << c.diagnosis.factor;
  }
}

INSTANTIATE_TEST_SUITE_P(Presets, TensorParallelGrid, ::testing::ValuesIn(allPresets()),
                         [](const auto& info) { return std::string(toString(info.param)); });

// Sequence parallelism shards the sequence over TP: the same gradients as TP 1 (the objective does
// not depend on how its tokens are placed), for the global and sequence objectives.
TEST(TensorParallel, ShardedTokensGiveTheSingleDeviceGradient) {
  for (AuxScope scope : {AuxScope::kSequence, AuxScope::kGlobalBatch}) {
    Scenario sc = gridScenario(Preset::kMegatron, Axes{1, 0, 1, 1, 1, 1, 1, scope});
    sc.aux.z_loss_coeff = 0.0;
    const std::vector<double> single = flat(auxGradient(sc));
    sc.mesh.tp = 4;
    sc.mesh.cp = 2;
    sc.mesh.dp = 3;
    validateScenario(sc);
    EXPECT_LE(relativeDifference(flat(auxGradient(sc)), single), 1e-13) << toString(scope);
  }
}

// per_token_local_count with a padding mask: the in-place count all-reduce makes the aux exact and
// only the z-loss stays x 1/(tp*cp), a direction error when both are on; without z-loss it passes.
TEST(TensorParallelFaults, PerTokenLocalCountWithAMaskIsADirectionErrorOnlyThroughTheZLoss) {
  Scenario sc = gridScenario(Preset::kMegatronPerToken, Axes{4, 0, 1, 3, 2, 1, 1, AuxScope::kMicroBatch});
  sc.data.batch = 6;
  sc.data.valid_lengths = {8, 6, 8, 3, 5, 7};
  sc.faults = {Fault::kPerTokenLocalCount};
  validateScenario(sc);
  bool direction = false;
  for (const CheckResult& c : checksOf(sc).checks)
    direction |= c.kind == CheckKind::kAuxGrad && c.diagnosis.code == DiagnosisCode::kAuxGradDirection;
  EXPECT_TRUE(direction);
  sc.aux.z_loss_coeff = 0.0;
  EXPECT_EQ(checksOf(sc).summary.verdict, Verdict::kPass);
}

}  // namespace
}  // namespace moe
