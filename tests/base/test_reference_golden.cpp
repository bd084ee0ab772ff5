// The reference's numbers did not move when it was split by concern (objective, forward cache,
// closed-form differences, Richardson, element-wise, directional): every gradient, value and counter
// of a table of problems against tests/base/data/reference_golden.json, written by the reference as it
// stood before the split (hex floats). Gradients agree to 1e-15 relative to their largest element,
// values to 1e-15 relative, counters exactly; the error estimates within a factor of 2 (estimates).
#include <gtest/gtest.h>

#include <cmath>
#include <fstream>
#include <string>

#include <nlohmann/json.hpp>

#include "data/problem.hpp"
#include "reference/reference.hpp"
#include "../reference_problem.hpp"

namespace moe {
namespace {

struct GoldenCase {
  const char* name;
  int seed, B, S, H, E, F, L, k;
  ScoreFunction score;
  bool norm;
  AuxScope scope;
  double alpha, beta;
  ZLossScope z_scope;
  bool padding;
  GroupWeighting weighting;
  MainLossScope main_scope;
  int dp, M;
  bool with_main;
  int directions;
  bool exclude_padding;
};

const GoldenCase kCases[] = {
    {"softmax_micro", 1, 4, 8, 8, 6, 4, 2, 2, ScoreFunction::kSoftmax, false, AuxScope::kMicroBatch, 0.01, 0.0,
     ZLossScope::kMicroBatch, true, GroupWeighting::kUniform, MainLossScope::kMicrobatchMean, 2, 1, true, 2, true},
    {"sigmoid_norm_seq", 2, 4, 8, 8, 6, 4, 2, 3, ScoreFunction::kSigmoid, true, AuxScope::kSequence, 0.1, 0.001,
     ZLossScope::kMicroBatch, true, GroupWeighting::kUniform, MainLossScope::kTokenMean, 1, 2, true, 2, true},
    {"softmax_norm_global_z", 3, 6, 4, 8, 8, 5, 3, 2, ScoreFunction::kSoftmax, true, AuxScope::kGlobalBatch, 0.05, 0.01,
     ZLossScope::kGlobalBatch, true, GroupWeighting::kUniform, MainLossScope::kMicrobatchMean, 3, 2, true, 1, true},
    {"sigmoid_micro_tokens", 4, 4, 8, 8, 6, 4, 2, 2, ScoreFunction::kSigmoid, false, AuxScope::kMicroBatch, 0.02, 0.003,
     ZLossScope::kMicroBatch, true, GroupWeighting::kTokens, MainLossScope::kTokenMean, 2, 2, true, 2, true},
    {"softmax_seq_tokens_nopad", 5, 3, 8, 6, 5, 3, 1, 2, ScoreFunction::kSoftmax, false, AuxScope::kSequence, 0.01, 0.0,
     ZLossScope::kMicroBatch, false, GroupWeighting::kTokens, MainLossScope::kMicrobatchMean, 1, 1, false, 0, true},
    {"softmax_count_padding_objective", 6, 4, 8, 8, 6, 4, 2, 2, ScoreFunction::kSoftmax, false, AuxScope::kMicroBatch,
     0.01, 0.002, ZLossScope::kMicroBatch, true, GroupWeighting::kUniform, MainLossScope::kMicrobatchMean, 2, 2, true, 1,
     false},
    {"sigmoid_global_4layers", 7, 2, 8, 6, 6, 3, 4, 2, ScoreFunction::kSigmoid, false, AuxScope::kGlobalBatch, 0.03, 0.0,
     ZLossScope::kMicroBatch, true, GroupWeighting::kUniform, MainLossScope::kTokenMean, 1, 1, true, 2, true},
};

double hex(const nlohmann::json& j) { return std::strtod(j.get<std::string>().c_str(), nullptr); }

void expectRelativelyEqual(double actual, double expected, double tol, const std::string& what) {
  EXPECT_LE(std::abs(actual - expected), tol * std::abs(expected)) << what << ": " << actual << " vs " << expected;
}

TEST(ReferenceGolden, NumbersUnchangedBySplittingTheReference) {
  std::ifstream in(std::string(MOE_SOURCE_DIR) + "/tests/base/data/reference_golden.json");
  ASSERT_TRUE(in.good());
  const nlohmann::json golden = nlohmann::json::parse(in);
  for (const GoldenCase& c : kCases) {
    SCOPED_TRACE(c.name);
    const nlohmann::json& g = golden.at(c.name);
    std::vector<int> valid_lengths;
    if (c.padding)
      for (int b = 0; b < c.B; ++b) valid_lengths.push_back(c.S - (b * 3) % c.S);
    const ProblemData d = generateProblem(test::problemScenario(c.seed, c.B, c.S, c.H, c.E, c.F, c.L, valid_lengths));
    const ObjectiveDefinition o = test::problemObjective({c.score, c.k, c.norm, c.scope, c.alpha, c.beta, c.z_scope,
                                                          c.exclude_padding, c.weighting, c.main_scope, c.dp, c.M});
    ReferenceOptions options;
    options.with_main = c.with_main;
    options.directional_checks = c.directions;
    const ReferenceResult r = computeReference(d, o, options);

    EXPECT_EQ(r.near_ties, g.at("near_ties").get<std::int64_t>());
    EXPECT_EQ(r.frozen_elements, g.at("frozen").get<std::int64_t>());
    EXPECT_EQ(r.empty_groups, g.at("empty_groups").get<std::int64_t>());
    EXPECT_EQ(r.max_step, hex(g.at("max_step")));
    expectRelativelyEqual(r.aux_value, hex(g.at("aux_value")), 1e-15, "aux_value");
    expectRelativelyEqual(r.z_value, hex(g.at("z_value")), 1e-15, "z_value");
    expectRelativelyEqual(r.main_value, hex(g.at("main_value")), 1e-15, "main_value");
    const double fd = hex(g.at("fd_error"));
    EXPECT_LE(r.fd_error_estimate, 2 * fd);
    EXPECT_GE(r.fd_error_estimate, 0.5 * fd);
    ASSERT_EQ(r.layers.size(), g.at("layers").size());
    for (std::size_t l = 0; l < r.layers.size(); ++l) {
      const nlohmann::json& gl = g.at("layers")[l];
      for (const char* key : {"aux_grad", "main_grad"}) {
        const std::vector<double>& got = std::string(key) == "aux_grad" ? r.layers[l].aux_grad : r.layers[l].main_grad;
        const nlohmann::json& want = gl.at(key);
        ASSERT_EQ(got.size(), want.size()) << key << " layer " << l;
        double largest = 0.0, diff = 0.0;
        for (std::size_t i = 0; i < got.size(); ++i) {
          largest = std::max(largest, std::abs(hex(want[i])));
          diff = std::max(diff, std::abs(got[i] - hex(want[i])));
        }
        EXPECT_LE(diff, 1e-15 * largest) << key << " layer " << l;
      }
      expectRelativelyEqual(r.layers[l].aux_value, hex(gl.at("aux_value")), 1e-15, "layer aux_value");
    }
    ASSERT_EQ(r.directional.size(), g.at("directional").size());
    for (std::size_t i = 0; i < r.directional.size(); ++i)
      expectRelativelyEqual(r.directional[i].derivative, hex(g.at("directional")[i][0]), 1e-12, "directional");
  }
}

}  // namespace
}  // namespace moe
