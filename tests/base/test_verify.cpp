// `verify` on captures whose gradients are written from closed forms of the declared objective, not from
// the reference: the DeepSeek-V3 aux loss (eqs. 17-20) has, with the counts held fixed,
//   J = alpha / G * sum_g E / (k T_g^2) * sum_e c_ge * sum_{t in g} p_te
//   dJ/dz_tj = alpha E / (G k T_g^2) * p_tj * (c_gj - sum_e c_ge p_te)          (softmax scores)
// and the ST-MoE z-loss J_z = beta / G_z * sum_g 1/T_g sum_{t in g} lse(z_t)^2 has
//   dJ_z/dz_tj = beta / (G_z T_g) * 2 lse(z_t) p_tj.
// With z = x W^T (nn.Linear layout), dJ/dW[j, :] = sum_t dJ/dz_tj x_t. Each case scales, zeroes or
// perturbs that gradient the way a known bug does and checks what verify names.
#include <gtest/gtest.h>

#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <functional>
#include <map>
#include <numeric>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "capture/capture.hpp"
#include "capture/capture_writer.hpp"
#include "common/errors.hpp"
#include "report/reporters.hpp"
#include "report_checkers.hpp"
#include "verify/verify.hpp"

namespace moe {
namespace {

namespace fs = std::filesystem;

// ---------------------------------------------------------------------------------------------
// The job: DP replica d, microbatch m holds sequence d * M + m (seq_len positions); TP ranks hold the
// same rows (rank = d * tp + t); sequence 0 ends in `padding` padding tokens.

struct Job {
  int dp = 3, tp = 2, microbatches = 2;
  int experts = 6, hidden = 5, top_k = 2, seq_len = 7;
  int padding = 2;
  AuxScope aux_type = AuxScope::kMicroBatch;
  double coeff = 0.01, z_coeff = 0.0;
  ZLossScope z_scope = ZLossScope::kMicroBatch;
  int world() const { return dp * tp; }
  int sequences() const { return dp * microbatches; }
};

struct Token {
  int sequence, position;
  bool valid;
  std::vector<double> x;
};

struct Layer {
  std::vector<double> weight;  // [E, H]
  std::vector<Token> tokens;   // every sequence's positions, sequence-major
};

Layer makeLayer(const Job& job, unsigned seed) {
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<double> u(-1.0, 1.0);
  Layer l;
  for (int i = 0; i < job.experts * job.hidden; ++i) l.weight.push_back(u(rng));
  for (int s = 0; s < job.sequences(); ++s)
    for (int p = 0; p < job.seq_len; ++p) {
      Token t{s, p, !(s == 0 && p >= job.seq_len - job.padding), {}};
      for (int h = 0; h < job.hidden; ++h) t.x.push_back(u(rng));
      l.tokens.push_back(t);
    }
  return l;
}

std::vector<double> logitsOf(const Job& job, const Layer& l, const Token& t) {
  std::vector<double> z(job.experts, 0.0);
  for (int e = 0; e < job.experts; ++e)
    for (int h = 0; h < job.hidden; ++h) z[e] += l.weight[e * job.hidden + h] * t.x[h];
  return z;
}

std::vector<int> topkOf(const Job& job, const std::vector<double>& z) {
  std::vector<int> order(job.experts);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return z[a] > z[b]; });
  return {order.begin(), order.begin() + job.top_k};
}

// Which group a token's aux (or z) term belongs to: -1 = none.
int auxGroup(const Job& job, AuxScope scope, const Token& t, bool count_padding) {
  if (!t.valid && !count_padding) return -1;
  switch (scope) {
    case AuxScope::kMicroBatch:
    case AuxScope::kSequence: return t.sequence;  // one sequence per (replica, microbatch) group
    case AuxScope::kGlobalBatch: return 0;
  }
  return -1;
}

struct ClosedFormOptions {
  bool count_padding = false;                         // Megatron-LM #1982: padding in f and P
  std::map<int, std::vector<int>> routed_differently;  // token index -> the top-k the job used
};

// dJ/dW [E, H] of the job's objective, from the closed forms above.
std::vector<double> closedFormGradient(const Job& job, const Layer& l, const ClosedFormOptions& o = {}) {
  const int E = job.experts, H = job.hidden, k = job.top_k;
  const int groups = job.aux_type == AuxScope::kGlobalBatch ? 1 : job.sequences();
  const int z_groups = job.z_scope == ZLossScope::kGlobalBatch ? 1 : job.sequences();
  const AuxScope z_scope = job.z_scope == ZLossScope::kGlobalBatch ? AuxScope::kGlobalBatch : AuxScope::kMicroBatch;
  std::vector<std::vector<double>> probs, logits;
  std::vector<std::vector<int>> topk;
  for (size_t i = 0; i < l.tokens.size(); ++i) {
    const std::vector<double> z = logitsOf(job, l, l.tokens[i]);
    const double zmax = *std::max_element(z.begin(), z.end());
    std::vector<double> p(E);
    double sum = 0;
    for (int e = 0; e < E; ++e) sum += p[e] = std::exp(z[e] - zmax);
    for (double& v : p) v /= sum;
    probs.push_back(p);
    logits.push_back(z);
    const auto it = o.routed_differently.find(static_cast<int>(i));
    topk.push_back(it != o.routed_differently.end() ? it->second : topkOf(job, z));
  }
  std::vector<std::vector<double>> counts(groups, std::vector<double>(E, 0.0));
  std::vector<double> tokens(groups, 0.0), z_tokens(z_groups, 0.0);
  for (size_t i = 0; i < l.tokens.size(); ++i) {
    const int g = auxGroup(job, job.aux_type, l.tokens[i], o.count_padding);
    if (g >= 0) {
      tokens[g] += 1;
      for (int e : topk[i]) counts[g][e] += 1;
    }
    const int zg = auxGroup(job, z_scope, l.tokens[i], false);
    if (zg >= 0) z_tokens[zg] += 1;
  }
  std::vector<double> grad(E * H, 0.0);
  for (size_t i = 0; i < l.tokens.size(); ++i) {
    const std::vector<double>& p = probs[i];
    std::vector<double> dz(E, 0.0);
    const int g = auxGroup(job, job.aux_type, l.tokens[i], o.count_padding);
    if (g >= 0 && job.coeff != 0) {
      double cp = 0;
      for (int e = 0; e < E; ++e) cp += counts[g][e] * p[e];
      const double a = job.coeff * E / (groups * k * tokens[g] * tokens[g]);
      for (int j = 0; j < E; ++j) dz[j] += a * p[j] * (counts[g][j] - cp);
    }
    const int zg = auxGroup(job, z_scope, l.tokens[i], false);
    if (zg >= 0 && job.z_coeff != 0) {
      const std::vector<double>& z = logits[i];
      const double zmax = *std::max_element(z.begin(), z.end());
      double s = 0;
      for (double v : z) s += std::exp(v - zmax);
      const double lse = zmax + std::log(s);
      for (int j = 0; j < E; ++j) dz[j] += job.z_coeff / (z_groups * z_tokens[zg]) * 2 * lse * p[j];
    }
    for (int j = 0; j < E; ++j)
      for (int h = 0; h < H; ++h) grad[j * H + h] += dz[j] * l.tokens[i].x[h];
  }
  return grad;
}

std::vector<double> scaled(std::vector<double> v, double s) {
  for (double& x : v) x *= s;
  return v;
}

// What each rank writes: its gradient, and the top-k the job recorded (none by default).
struct RankGradients {
  std::function<std::vector<double>(int rank)> grad;
  CaptureFloat grad_dtype = CaptureFloat::kF64;
  std::map<int, std::vector<int>> recorded_topk;  // token index -> top-k; empty = topk not written
};

std::vector<CaptureRankRecord> captureOf(const Job& job, const Layer& l, const RankGradients& g) {
  std::vector<CaptureRankRecord> ranks;
  for (int d = 0; d < job.dp; ++d)
    for (int t = 0; t < job.tp; ++t) {
      CaptureRankRecord r;
      CaptureManifest& m = r.manifest;
      m.rank = d * job.tp + t;
      m.world_size = job.world();
      m.mesh.dp = d;
      m.mesh.dp_size = job.dp;
      m.mesh.tp = t;
      m.mesh.tp_size = job.tp;
      m.mesh.microbatches = job.microbatches;
      m.layers = {0};
      m.seq_len = job.seq_len;
      m.objective.aux_scope = job.aux_type;
      m.objective.aux_coeff = job.coeff;
      m.objective.z_coeff = job.z_coeff;
      m.objective.z_scope = job.z_scope;
      m.objective.top_k = job.top_k;
      m.objective.score = ScoreFunction::kSoftmax;
      m.objective.compute_dtype = DType::kFloat64;
      m.objective.compute_dtype_given = true;
      m.framework = "closed-form job";
      m.created_by = "tests/base/test_verify.cpp";
      r.weight_dtype = r.input_dtype = r.bias_dtype = CaptureFloat::kF64;
      r.grad_dtype = g.grad_dtype;
      CaptureLayerRecord layer;
      layer.layer = 0;
      layer.experts = job.experts;
      layer.hidden = job.hidden;
      layer.weight = l.weight;
      layer.grad = g.grad(m.rank);
      for (int mb = 0; mb < job.microbatches; ++mb) {
        CaptureMicrobatchRecord rec;
        rec.microbatch = mb;
        for (size_t i = 0; i < l.tokens.size(); ++i) {
          const Token& tok = l.tokens[i];
          if (tok.sequence != d * job.microbatches + mb) continue;
          rec.sequence.push_back(tok.sequence);
          rec.position.push_back(tok.position);
          rec.valid.push_back(tok.valid ? 1 : 0);
          rec.input.insert(rec.input.end(), tok.x.begin(), tok.x.end());
          if (!g.recorded_topk.empty()) {
            const auto it = g.recorded_topk.find(static_cast<int>(i));
            const std::vector<int> k = it != g.recorded_topk.end() ? it->second : topkOf(job, logitsOf(job, l, tok));
            rec.topk.insert(rec.topk.end(), k.begin(), k.end());
          }
        }
        layer.microbatches.push_back(rec);
      }
      r.layers.push_back(layer);
      ranks.push_back(r);
    }
  return ranks;
}

class TempDir {
 public:
  TempDir() {
    char t[] = "/tmp/moe-verify-test-XXXXXX";
    path_ = mkdtemp(t);
  }
  ~TempDir() {
    std::error_code ec;
    fs::remove_all(path_, ec);
  }
  std::string path() const { return path_; }

 private:
  std::string path_;
};

Report verifyJob(const Job& job, const Layer& l, const RankGradients& g, const VerifyOptions& options = {}) {
  TempDir dir;
  writeCapture(dir.path(), captureOf(job, l, g));
  return verifyCaptureDirectory(dir.path(), options, ToolInfo{"test", "", {}});
}

const CheckResult& checkNamed(const Report& r, const std::string& name) {
  for (const CheckResult& c : r.checks)
    if (c.name == name) return c;
  throw std::runtime_error("no check " + name);
}

std::string describe(const Report& r) {
  std::ostringstream out;
  for (const CheckResult& c : r.checks)
    out << "\n  " << c.name << " ok=" << c.ok << " scale=" << c.scale << " cosine=" << c.cosine << " "
        << toString(c.diagnosis.code) << " " << c.diagnosis.factor;
  return out.str();
}

// ---------------------------------------------------------------------------------------------
// The table: a bug's effect on the gradient every rank holds, and what verify must name.

struct BugCase {
  const char* name;
  Job job;
  std::function<std::vector<double>(const Job&, const Layer&, int rank)> grad;
  Verdict verdict;
  DiagnosisCode code;  // of aux_grad/layer0/router_weight, or of replicas/layer0 for divergence
  const char* factor;  // "" = not checked
};

std::vector<double> correct(const Job& j, const Layer& l, int) { return closedFormGradient(j, l); }

Job withScope(Job j, AuxScope s) {
  j.aux_type = s;
  return j;
}
Job withZLoss(Job j, ZLossScope s) {
  j.z_coeff = 1e-3;
  j.z_scope = s;
  return j;
}

std::vector<BugCase> bugCases() {
  const Job base;
  return {
      {"correct micro_batch", base, correct, Verdict::kPass, DiagnosisCode::kNone, ""},
      {"correct sequence", withScope(base, AuxScope::kSequence), correct, Verdict::kPass, DiagnosisCode::kNone, ""},
      {"correct global_batch", withScope(base, AuxScope::kGlobalBatch), correct, Verdict::kPass,
       DiagnosisCode::kNone, ""},
      {"correct with micro_batch z-loss", withZLoss(base, ZLossScope::kMicroBatch), correct, Verdict::kPass,
       DiagnosisCode::kNone, ""},
      {"correct with global z-loss", withZLoss(base, ZLossScope::kGlobalBatch), correct, Verdict::kPass,
       DiagnosisCode::kNone, ""},
      // Megatron-LM #3672: the global aux loss divided by the global token count while P stays local.
      {"DP averaging not compensated", base,
       [](const Job& j, const Layer& l, int) { return scaled(closedFormGradient(j, l), 1.0 / j.dp); },
       Verdict::kFail, DiagnosisCode::kAuxGradScaled, "1/dp"},
      // NeMo Automodel #1408 (accumulation_overweight): summed over microbatches instead of averaged.
      {"accumulation not averaged", base,
       [](const Job& j, const Layer& l, int) { return scaled(closedFormGradient(j, l), j.microbatches); },
       Verdict::kFail, DiagnosisCode::kAuxGradScaled, "M"},
      // HF transformers #48690: the loss multiplied by the world size before DDP averages.
      {"world-size multiply", base,
       [](const Job& j, const Layer& l, int) { return scaled(closedFormGradient(j, l), j.world()); },
       Verdict::kFail, DiagnosisCode::kAuxGradScaled, "world"},
      // NeMo Automodel #1408: the injection's return value discarded.
      {"aux gradient missing", base,
       [](const Job& j, const Layer&, int) { return std::vector<double>(j.experts * j.hidden, 0.0); },
       Verdict::kFail, DiagnosisCode::kAuxGradMissing, "0"},
      // Megatron-LM #1982: padding counted in f and P.
      {"padding counted", base,
       [](const Job& j, const Layer& l, int) {
         ClosedFormOptions o;
         o.count_padding = true;
         return closedFormGradient(j, l, o);
       },
       Verdict::kFail, DiagnosisCode::kAuxGradDirection, ""},
      // A rank that skipped the reduction: its replica differs.
      {"one replica diverges", base,
       [](const Job& j, const Layer& l, int rank) {
         return scaled(closedFormGradient(j, l), rank == 3 ? 0.5 : 1.0);
       },
       Verdict::kFail, DiagnosisCode::kReplicaDivergence, ""},
  };
}

class VerifyBugTable : public ::testing::TestWithParam<BugCase> {};

TEST_P(VerifyBugTable, NamesWhatTheJobGotWrong) {
  const BugCase& c = GetParam();
  const Layer layer = makeLayer(c.job, 7);
  RankGradients g;
  g.grad = [&](int rank) { return c.grad(c.job, layer, rank); };
  const Report r = verifyJob(c.job, layer, g);
  EXPECT_EQ(r.summary.verdict, c.verdict) << describe(r);
  const bool replica_case = c.code == DiagnosisCode::kReplicaDivergence;
  const CheckResult& aux = checkNamed(r, "aux_grad/layer0/router_weight");
  const CheckResult& replicas = checkNamed(r, "replicas/layer0");
  EXPECT_EQ(replicas.ok, !replica_case) << describe(r);
  if (c.verdict == Verdict::kPass || replica_case) {
    EXPECT_TRUE(aux.ok) << describe(r);  // rank 0's gradient is the right one
    EXPECT_NEAR(aux.scale, 1.0, 1e-9);
    EXPECT_NEAR(aux.cosine, 1.0, 1e-12);
    EXPECT_EQ(aux.wrong, 0);
  }
  if (replica_case) EXPECT_EQ(replicas.diagnosis.code, c.code);
  if (c.verdict == Verdict::kFail && !replica_case) {
    EXPECT_FALSE(aux.ok);
    EXPECT_EQ(aux.diagnosis.code, c.code) << describe(r);
    if (std::string(c.factor) != "") EXPECT_EQ(aux.diagnosis.factor, c.factor) << describe(r);
  }
  EXPECT_EQ(checkNamed(r, "routing/layer0").wrong, 0);
  EXPECT_TRUE(r.summary.expectation_met == (c.verdict == Verdict::kPass));
}

INSTANTIATE_TEST_SUITE_P(ClosedForms, VerifyBugTable, ::testing::ValuesIn(bugCases()), [](const auto& info) {
  std::string n = info.param.name;
  for (char& ch : n)
    if (!std::isalnum(static_cast<unsigned char>(ch))) ch = '_';
  return n;
});

// ---------------------------------------------------------------------------------------------

TEST(Verify, SequenceAuxEqualsMicroBatchAuxWhenEachGroupIsOneSequence) {
  Job job;
  const Layer layer = makeLayer(job, 11);
  const std::vector<double> micro = closedFormGradient(job, layer);
  job.aux_type = AuxScope::kSequence;
  EXPECT_EQ(closedFormGradient(job, layer), micro);  // the closed forms agree: one sequence per group
  RankGradients g;
  g.grad = [&](int) { return micro; };
  const Report r = verifyJob(job, layer, g);
  EXPECT_EQ(r.summary.verdict, Verdict::kPass) << describe(r);
}

TEST(Verify, Float32GradientsPassAtTheirDefaultTolerance) {
  const Job job;
  const Layer layer = makeLayer(job, 3);
  RankGradients g;
  g.grad = [&](int) { return closedFormGradient(job, layer); };
  g.grad_dtype = CaptureFloat::kF32;
  const Report r = verifyJob(job, layer, g);
  EXPECT_EQ(r.summary.verdict, Verdict::kPass) << describe(r);
  // The tolerance of an F32 gradient with float64 compute is float32's.
  EXPECT_DOUBLE_EQ(checkNamed(r, "aux_grad/layer0/router_weight").rtol, 1e-4);
}

TEST(Verify, RecordedRoutingIsWhatTheReferenceUsesAndItsDifferenceIsCounted) {
  const Job job;
  const Layer layer = makeLayer(job, 5);
  // Token 9 routed to the experts float64 ranks last (as if a lower precision had flipped a tie).
  const std::vector<double> z = logitsOf(job, layer, layer.tokens[9]);
  std::vector<int> order(job.experts);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return z[a] < z[b]; });
  ClosedFormOptions o;
  o.routed_differently[9] = {order[0], order[1]};
  RankGradients g;
  g.grad = [&](int) { return closedFormGradient(job, layer, o); };
  g.recorded_topk = o.routed_differently;
  const Report r = verifyJob(job, layer, g);
  EXPECT_EQ(r.summary.verdict, Verdict::kPass) << describe(r);
  const CheckResult& routing = checkNamed(r, "routing/layer0");
  EXPECT_EQ(routing.wrong, 1);
  EXPECT_EQ(routing.diagnosis.code, DiagnosisCode::kRoutingDiffers);
  EXPECT_TRUE(routing.informational);
}

TEST(Verify, ExpectationTurnsAKnownBugIntoARegressionTest) {
  const Job job;
  const Layer layer = makeLayer(job, 7);
  RankGradients g;
  g.grad = [&](int) { return scaled(closedFormGradient(job, layer), 1.0 / job.dp); };
  VerifyOptions options;
  options.expect = parseExpectation("diagnosis=AUX_GRAD_SCALED,factor=1/dp");
  EXPECT_TRUE(verifyJob(job, layer, g, options).summary.expectation_met);
  options.expect = parseExpectation("diagnosis=AUX_GRAD_SCALED,factor=1/cp");
  EXPECT_FALSE(verifyJob(job, layer, g, options).summary.expectation_met);
  // Once fixed, the regression test fails: the behaviour changed.
  g.grad = [&](int) { return closedFormGradient(job, layer); };
  options.expect = parseExpectation("diagnosis=AUX_GRAD_SCALED,factor=1/dp");
  EXPECT_FALSE(verifyJob(job, layer, g, options).summary.expectation_met);
}

TEST(Verify, JsonReportSatisfiesItsSchema) {
  const Job job;
  const Layer layer = makeLayer(job, 7);
  RankGradients g;
  g.grad = [&](int) { return scaled(closedFormGradient(job, layer), 1.0 / job.dp); };
  const Report r = verifyJob(job, layer, g);
  std::ostringstream text;
  JsonReporter reporter(text);
  writeReport(r, reporter);
  const nlohmann::json j = nlohmann::json::parse(text.str());
  EXPECT_EQ(j["kind"], "verify");
  EXPECT_EQ(j["verdict"], "fail");
  EXPECT_EQ(j["capture"]["world_size"], job.world());
  const std::vector<std::string> errors = test::schemaErrors(j, "verify.schema.json");
  EXPECT_TRUE(errors.empty()) << test::joined(errors);
}

struct ExpectationCase {
  const char* text;
  Verdict verdict;
  DiagnosisCode code;
  const char* factor;
};

TEST(Verify, ParseExpectation) {
  const ExpectationCase cases[] = {
      {"", Verdict::kPass, DiagnosisCode::kNone, ""},
      {"verdict=pass", Verdict::kPass, DiagnosisCode::kNone, ""},
      {"verdict=fail", Verdict::kFail, DiagnosisCode::kNone, ""},
      {"diagnosis=AUX_GRAD_MISSING", Verdict::kFail, DiagnosisCode::kAuxGradMissing, ""},
      {"factor=1/dp", Verdict::kFail, DiagnosisCode::kNone, "1/dp"},
      {"diagnosis=ROUTING_DIFFERS", Verdict::kPass, DiagnosisCode::kRoutingDiffers, ""},  // informational
      {"verdict=pass,diagnosis=FD_UNRELIABLE", Verdict::kPass, DiagnosisCode::kFdUnreliable, ""},
  };
  for (const ExpectationCase& c : cases) {
    const Expectation e = parseExpectation(c.text);
    EXPECT_EQ(e.verdict, c.verdict) << c.text;
    EXPECT_EQ(e.diagnosis, c.code) << c.text;
    EXPECT_EQ(e.factor, c.factor) << c.text;
  }
  for (const char* bad : {"verdict=maybe", "diagnosis=NOPE", "colour=red", "verdict"}) {
    try {
      parseExpectation(bad);
      ADD_FAILURE() << bad << " was accepted";
    } catch (const UsageError& e) {
      EXPECT_NE(std::string(e.what()).find("--expect"), std::string::npos) << e.what();
    }
  }
}

}  // namespace
}  // namespace moe
