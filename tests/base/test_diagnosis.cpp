// The checker and the factor attribution: closed-form inputs with known answers.
#include <gtest/gtest.h>

#include <cmath>

#include "check/compare.hpp"
#include "check/diagnosis.hpp"

namespace moe {
namespace {

MeshQuantities mesh(int dp, int cp, int M, int pp = 1, int mbs = 1, double tokens = 97) {
  MeshQuantities q;
  q.sizes.dp = dp;
  q.sizes.cp = cp;
  q.sizes.microbatches = M;
  q.sizes.pp = pp;
  q.micro_batch_size = mbs;
  q.tokens = tokens;
  return q;
}

const std::string kKnob = "the MoEAuxLossAutoScaler backward scale";

struct FactorCase {
  double scale;
  const char* expected;
};

class FactorAttribution : public ::testing::TestWithParam<FactorCase> {};

TEST_P(FactorAttribution, SimplestProductOfDistinctQuantities) {
  const auto m = attributeFactor(GetParam().scale, mesh(3, 2, 5), 1e-9);
  ASSERT_TRUE(m.has_value());
  EXPECT_EQ(m->expression, GetParam().expected);
  EXPECT_TRUE(m->alternatives.empty()) << m->alternatives.front();
}

INSTANTIATE_TEST_SUITE_P(Table, FactorAttribution,
                         ::testing::Values(FactorCase{1.0 / 3, "1/dp"}, FactorCase{0.5, "1/cp"},
                                           FactorCase{5.0, "M"}, FactorCase{2.5, "M/cp"},
                                           FactorCase{3.0, "dp"}, FactorCase{6.0, "dp*cp"},
                                           FactorCase{1.0 / 30, "1/(dp*cp*M)"},
                                           FactorCase{1.0 / 97, "1/tokens"},
                                           FactorCase{15.0 / 97, "dp*M/tokens"},
                                           FactorCase{1.0, "1"}));

TEST(FactorAttribution, UnexplainedScaleHasNoMatch) {
  EXPECT_FALSE(attributeFactor(1.7, mesh(3, 2, 5), 1e-9).has_value());
  EXPECT_FALSE(attributeFactor(0.0, mesh(3, 2, 5), 1e-9).has_value());
  EXPECT_FALSE(attributeFactor(NAN, mesh(3, 2, 5), 1e-9).has_value());
}

TEST(FactorAttribution, EqualQuantitiesAreReportedAsAlternatives) {
  const auto m = attributeFactor(0.5, mesh(2, 2, 1), 1e-9);
  ASSERT_TRUE(m.has_value());
  EXPECT_EQ(m->expression, "1/dp");
  ASSERT_EQ(m->alternatives.size(), 1u);
  EXPECT_EQ(m->alternatives[0], "1/cp");
}

TEST(FactorAttribution, QuantitiesEqualToOneAreSkipped) {
  // With dp = 1 a halving cannot be "1/dp".
  const auto m = attributeFactor(0.5, mesh(1, 2, 1), 1e-9);
  ASSERT_TRUE(m.has_value());
  EXPECT_EQ(m->expression, "1/cp");
}

TEST(CompareVectors, ExactMatchHasScaleAndCosineOne) {
  const std::vector<double> r = {1.0, -2.0, 3.0};
  const CheckResult c = compareVectors("x", r, r, 1e-12, 0.0);
  EXPECT_TRUE(c.ok);
  EXPECT_EQ(c.wrong, 0);
  EXPECT_DOUBLE_EQ(c.scale, 1.0);
  EXPECT_DOUBLE_EQ(c.cosine, 1.0);
  EXPECT_EQ(c.max_abs_err, 0.0);
}

TEST(CompareVectors, QuarterScaleIsMeasuredAndEveryNonzeroElementIsWrong) {
  const std::vector<double> r = {4.0, 0.0, -8.0}, a = {1.0, 0.0, -2.0};
  const CheckResult c = compareVectors("x", a, r, 1e-7, 0.0);
  EXPECT_FALSE(c.ok);
  EXPECT_EQ(c.wrong, 2);  // the zero element matches
  EXPECT_DOUBLE_EQ(c.scale, 0.25);
  EXPECT_DOUBLE_EQ(c.cosine, 1.0);
  EXPECT_DOUBLE_EQ(c.max_abs_err, 6.0);
  EXPECT_DOUBLE_EQ(c.max_rel_err, 0.75);
}

TEST(CompareVectors, NormwiseBoundToleratesTinyElementErrors) {
  // |err| = 1e-9 on an element of 1e-12: relative to that element it is huge, but the bound is
  // rtol * max|r| = 1e-7 * 1 = 1e-7.
  const std::vector<double> r = {1.0, 1e-12}, a = {1.0, 1e-12 + 1e-9};
  EXPECT_TRUE(compareVectors("x", a, r, 1e-7, 0.0).ok);
}

TEST(CompareVectors, NanIsWrong) {
  const CheckResult c = compareVectors("x", {NAN, 1.0}, {1.0, 1.0}, 1e-7, 0.0);
  EXPECT_FALSE(c.ok);
  EXPECT_EQ(c.wrong, 1);
}

TEST(Diagnose, ZeroGradientIsMissing) {
  CheckResult c = compareVectors("g", {0.0, 0.0}, {1.0, 2.0}, 1e-7, 0.0);
  diagnoseAuxGradient(c, mesh(3, 1, 5), kKnob, 0.0, std::sqrt(5.0));
  EXPECT_EQ(c.diagnosis.code, DiagnosisCode::kAuxGradMissing);
  EXPECT_EQ(c.diagnosis.factor, "0");
}

TEST(Diagnose, ParallelButScaledIsAttributed) {
  CheckResult c = compareVectors("g", {1.0 / 3, 2.0 / 3}, {1.0, 2.0}, 1e-7, 0.0);
  diagnoseAuxGradient(c, mesh(3, 2, 5), kKnob, 1.0, 1.0);
  EXPECT_EQ(c.diagnosis.code, DiagnosisCode::kAuxGradScaled);
  EXPECT_EQ(c.diagnosis.factor, "1/dp");
  EXPECT_NE(c.diagnosis.cause.find("#3672"), std::string::npos);
  EXPECT_NE(c.diagnosis.fix.find("backward scale"), std::string::npos);
}

TEST(Diagnose, TurnedGradientIsDirection) {
  CheckResult c = compareVectors("g", {1.0, 0.0}, {1.0, 1.0}, 1e-7, 0.0);
  diagnoseAuxGradient(c, mesh(3, 2, 5), kKnob, 1.0, std::sqrt(2.0));
  EXPECT_EQ(c.diagnosis.code, DiagnosisCode::kAuxGradDirection);
  EXPECT_NEAR(c.diagnosis.value, std::sqrt(0.5), 1e-15);
}

TEST(Diagnose, UnexplainedScaleSaysSo) {
  CheckResult c = compareVectors("g", {1.7, 3.4}, {1.0, 2.0}, 1e-7, 0.0);
  diagnoseAuxGradient(c, mesh(3, 2, 5), kKnob, 1.0, 1.0);
  EXPECT_EQ(c.diagnosis.factor, "unexplained");
  EXPECT_NE(c.diagnosis.cause.find("1.7"), std::string::npos);
}

}  // namespace
}  // namespace moe
