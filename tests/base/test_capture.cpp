// Captures of a real job (docs/capture-format.md): a valid capture loads with the right tokens,
// groups, weights and gradients; every rule of the format has a case below that breaks it and checks
// the file, the tensor or manifest key and the message; the float conversions are checked bit by bit.
//
// Expected values come from the formulas the test writes the capture with (inputFor, weightFor, ...),
// never from the loader.
#include <gtest/gtest.h>

#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <limits>
#include <map>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "capture/capture.hpp"
#include "capture/capture_manifest.hpp"
#include "capture/capture_writer.hpp"
#include "capture/float_formats.hpp"
#include "common/errors.hpp"
#include "data/safetensors.hpp"
#include "../capture_job.hpp"

namespace moe {
namespace {

namespace fs = std::filesystem;
using OrderedJson = nlohmann::ordered_json;

using namespace testjob;  // JobShape, buildJob and the value formulas

// Lookups into records, for edits.
CaptureLayerRecord& layerOf(std::vector<CaptureRankRecord>& ranks, int rank, int layer) {
  for (CaptureLayerRecord& l : ranks[rank].layers)
    if (l.layer == layer) return l;
  throw std::logic_error("no such layer in the test job");
}
CaptureMicrobatchRecord& mbOf(std::vector<CaptureRankRecord>& ranks, int rank, int layer, int microbatch) {
  for (CaptureMicrobatchRecord& m : layerOf(ranks, rank, layer).microbatches)
    if (m.microbatch == microbatch) return m;
  throw std::logic_error("no such microbatch in the test job");
}
std::size_t rowOf(const CaptureMicrobatchRecord& mb, std::int64_t sequence, std::int64_t position) {
  for (std::size_t i = 0; i < mb.sequence.size(); ++i)
    if (mb.sequence[i] == sequence && mb.position[i] == position) return i;
  throw std::logic_error("no such row in the test job");
}
void removeRow(CaptureMicrobatchRecord& mb, std::size_t row, int hidden, int top_k) {
  mb.sequence.erase(mb.sequence.begin() + row);
  mb.position.erase(mb.position.begin() + row);
  mb.valid.erase(mb.valid.begin() + row);
  mb.input.erase(mb.input.begin() + row * hidden, mb.input.begin() + (row + 1) * hidden);
  if (!mb.topk.empty()) mb.topk.erase(mb.topk.begin() + row * top_k, mb.topk.begin() + (row + 1) * top_k);
}
// `value` moved by `ulps` units in the last place of binary32, upwards.
double f32Ulps(double value, int ulps) {
  float f = static_cast<float>(value);
  for (int i = 0; i < ulps; ++i) f = std::nextafter(f, std::numeric_limits<float>::infinity());
  return f;
}

// ---------------------------------------------------------------------------------------------
// Editing written files.

std::string slurp(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream buffer;
  buffer << in.rdbuf();
  return buffer.str();
}
void spit(const fs::path& path, const std::string& bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out << bytes;
}
fs::path rankPath(const fs::path& dir, int rank) {
  return dir / ("rank" + std::to_string(rank) + ".safetensors");
}

// Rewrites a rank file's tensors and metadata through the safetensors writer.
void editFile(
    const fs::path& dir, int rank,
    const std::function<void(std::vector<NamedTensor>&, std::map<std::string, std::string>&)>& edit) {
  SafetensorsFile file = readSafetensorsFile(rankPath(dir, rank).string());
  edit(file.tensors, file.metadata);
  writeSafetensors(rankPath(dir, rank).string(), file.tensors, file.metadata);
}
void editTensors(const fs::path& dir, int rank, const std::function<void(std::vector<NamedTensor>&)>& edit) {
  editFile(dir, rank,
           [&](std::vector<NamedTensor>& tensors, std::map<std::string, std::string>&) { edit(tensors); });
}
NamedTensor& tensorNamed(std::vector<NamedTensor>& tensors, const std::string& name) {
  for (NamedTensor& t : tensors)
    if (t.name == name) return t;
  throw std::logic_error("no tensor " + name + " in the test file");
}
void removeTensor(std::vector<NamedTensor>& tensors, const std::string& name) {
  tensors.erase(
      std::remove_if(tensors.begin(), tensors.end(), [&](const NamedTensor& t) { return t.name == name; }),
      tensors.end());
}
void renameTensor(std::vector<NamedTensor>& tensors, const std::string& from, const std::string& to) {
  tensorNamed(tensors, from).name = to;
}
// The manifest text of a rank file, edited as text (duplicate keys, NaN literals) ...
void editManifestText(const fs::path& dir, int rank, const std::function<void(std::string&)>& edit) {
  editFile(dir, rank, [&](std::vector<NamedTensor>&, std::map<std::string, std::string>& metadata) {
    edit(metadata.at(kCaptureManifestKey));
  });
}
void replaceOnce(std::string& text, const std::string& from, const std::string& to) {
  const std::size_t at = text.find(from);
  if (at == std::string::npos) throw std::logic_error("\"" + from + "\" not in " + text);
  text.replace(at, from.size(), to);
}
// ... or as JSON.
void editManifest(const fs::path& dir, int rank, const std::function<void(OrderedJson&)>& edit) {
  editManifestText(dir, rank, [&](std::string& text) {
    OrderedJson manifest = OrderedJson::parse(text);
    edit(manifest);
    text = manifest.dump();
  });
}
void editAllManifests(const fs::path& dir, int world, const std::function<void(OrderedJson&)>& edit) {
  for (int r = 0; r < world; ++r) editManifest(dir, r, edit);
}
// The raw safetensors header, keeping the data buffer as it is (offsets, shapes beyond the file).
void editHeader(const fs::path& dir, int rank, const std::function<void(OrderedJson&)>& edit) {
  const std::string bytes = slurp(rankPath(dir, rank));
  std::uint64_t length = 0;
  for (int i = 0; i < 8; ++i) length |= std::uint64_t(static_cast<unsigned char>(bytes[i])) << (8 * i);
  OrderedJson header = OrderedJson::parse(bytes.substr(8, length));
  edit(header);
  const std::string text = header.dump();
  std::string out;
  for (int i = 0; i < 8; ++i) out.push_back(static_cast<char>((text.size() >> (8 * i)) & 0xff));
  spit(rankPath(dir, rank), out + text + bytes.substr(8 + length));
}

// ---------------------------------------------------------------------------------------------
// Fixture.

class CaptureTest : public ::testing::Test {
 protected:
  void SetUp() override {
    const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
    std::string name = std::string(info->test_suite_name()) + "_" + info->name();
    for (char& c : name)
      if (c == '/') c = '_';
    root_ = fs::temp_directory_path() / ("moe_capture_test_" + std::to_string(::getpid()) + "_" + name);
    fs::remove_all(root_);
    fs::create_directories(root_);
    dir_ = root_ / "capture";
  }
  void TearDown() override {
    std::error_code ec;
    fs::permissions(root_, fs::perms::owner_all, fs::perm_options::add, ec);
    fs::remove_all(root_, ec);
  }
  std::string dir() const { return dir_.string(); }
  std::string fileOf(int rank) const { return rankPath(dir_, rank).string(); }

  // loadCapture must throw InputError naming `file` (relative to the capture directory; "" = the
  // directory itself) and `pointer`, with every fragment in the message; returns the message.
  std::string expectRejected(const std::string& file, const std::string& pointer,
                             const std::vector<std::string>& fragments) const {
    try {
      loadCapture(dir());
    } catch (const InputError& e) {
      const std::string message = e.what();
      const std::string expected_file = file.empty() ? dir() : (dir_ / file).string();
      EXPECT_EQ(e.file(), expected_file) << message;
      EXPECT_EQ(e.jsonPath(), pointer) << message;
      EXPECT_EQ(e.code(), ExitCode::kInvalidInput);
      const std::string prefix = expected_file + (pointer.empty() ? ": " : ": " + pointer + ": ");
      EXPECT_EQ(message.rfind(prefix, 0), 0u) << message;
      for (const std::string& fragment : fragments)
        EXPECT_NE(message.find(fragment), std::string::npos)
            << "message: " << message << "\nmissing: " << fragment;
      return message;
    } catch (const std::exception& e) {
      ADD_FAILURE() << "expected InputError, got another exception: " << e.what();
      return "";
    }
    ADD_FAILURE() << "expected InputError, the capture loaded";
    return "";
  }

  fs::path root_, dir_;
};

// ================================================================ a valid capture

TEST_F(CaptureTest, LoadsTokensGroupsWeightsAndGradients) {
  const JobShape job;  // dp 2 x tp 2, two layers, two microbatches
  writeCapture(dir(), buildJob(job));
  const Capture capture = loadCapture(dir());

  EXPECT_EQ(capture.directory, dir());
  EXPECT_EQ(capture.world_size, 4);
  ASSERT_EQ(capture.rank_manifests.size(), 4u);
  EXPECT_EQ(capture.mappings.size(), 4u);
  std::uint64_t bytes = 0;
  for (int r = 0; r < 4; ++r) {
    bytes += fs::file_size(fileOf(r));
    EXPECT_EQ(capture.rank_manifests[r].rank, r);
    EXPECT_EQ(capture.rank_manifests[r].mesh.dp, r / 2);
    EXPECT_EQ(capture.rank_manifests[r].mesh.tp, r % 2);
  }
  EXPECT_EQ(capture.bytes_on_disk, bytes);
  const CaptureManifest& m = capture.manifest;
  EXPECT_EQ(m.schema_version, 1);
  EXPECT_EQ(m.rank, 0);
  EXPECT_EQ(m.mesh.dp_size, 2);
  EXPECT_EQ(m.mesh.tp_size, 2);
  EXPECT_EQ(m.mesh.microbatches, 2);
  EXPECT_EQ(m.layers, (std::vector<int>{0, 1}));
  EXPECT_EQ(m.seq_len, 4);
  EXPECT_EQ(m.objective.aux_scope, AuxScope::kMicroBatch);
  EXPECT_EQ(m.objective.aux_coeff, 0.01);
  EXPECT_EQ(m.objective.top_k, 2);
  EXPECT_EQ(m.framework, "unit test");
  EXPECT_EQ(m.created_by, "tests/base/test_capture.cpp");

  ASSERT_EQ(capture.layers.size(), 2u);
  for (int l = 0; l < 2; ++l) {
    const CaptureLayer& layer = capture.layers[l];
    EXPECT_EQ(layer.layer, l);
    EXPECT_EQ(layer.experts, 4);
    EXPECT_EQ(layer.hidden, 3);
    EXPECT_EQ(layer.ranks, (std::vector<int>{0, 1, 2, 3}));
    std::vector<double> weight;
    for (int e = 0; e < 4; ++e)
      for (int h = 0; h < 3; ++h) weight.push_back(weightFor(l, e, h));
    EXPECT_EQ(layer.weight, weight);
    EXPECT_TRUE(layer.expert_bias.empty());
    EXPECT_TRUE(layer.topk.empty());
    EXPECT_EQ(layer.grad_dtype, CaptureFloat::kF32);
    ASSERT_EQ(layer.grads.size(), 4u);
    for (int r = 0; r < 4; ++r) {
      std::vector<double> grad;
      for (int e = 0; e < 4; ++e)
        for (int h = 0; h < 3; ++h) grad.push_back(gradFor(r, l, e, h));
      EXPECT_EQ(layer.grads[r], grad) << "rank " << r;
    }
    // 4 sequences x 4 positions, each recorded by both TP ranks of its replica: 16 distinct tokens,
    // sorted by (sequence, position).
    ASSERT_EQ(layer.tokens.size(), 16u);
    ASSERT_EQ(layer.row_data.size(), 16u);
    std::vector<double> rows(16 * 3);
    layer.readRows(0, 16, rows.data());
    for (int t = 0; t < 16; ++t) {
      const CaptureToken& token = layer.tokens[t];
      EXPECT_EQ(token.sequence, t / 4);
      EXPECT_EQ(token.position, t % 4);
      EXPECT_EQ(token.dp, t / 8);  // sequences 0, 1 on replica 0
      EXPECT_EQ(token.microbatch, t / 4 % 2);
      EXPECT_EQ(token.valid, t != 15);  // the last position of the last sequence is padding
      EXPECT_EQ(layer.row_dtype[t], CaptureFloat::kF32);
      for (int c = 0; c < 3; ++c) EXPECT_EQ(rows[t * 3 + c], inputFor(l, t / 4, t % 4, c)) << t << "," << c;
    }
    // A window of rows reads the same values.
    std::vector<double> window(2 * 3);
    layer.readRows(5, 2, window.data());
    EXPECT_EQ(window, std::vector<double>(rows.begin() + 15, rows.begin() + 21));
  }
}

TEST_F(CaptureTest, TopkAndExpertBiasAreAssembled) {
  JobShape job;
  job.topk = true;
  job.expert_bias = true;
  writeCapture(dir(), buildJob(job));
  const Capture capture = loadCapture(dir());
  for (const CaptureLayer& layer : capture.layers) {
    EXPECT_EQ(layer.expert_bias, (std::vector<double>{biasFor(layer.layer, 0), biasFor(layer.layer, 1),
                                                      biasFor(layer.layer, 2), biasFor(layer.layer, 3)}));
    ASSERT_EQ(layer.topk.size(), layer.tokens.size() * 2);
    for (std::size_t t = 0; t < layer.tokens.size(); ++t) {
      const CaptureToken& token = layer.tokens[t];
      EXPECT_EQ(layer.topk[2 * t], topkFor(token.sequence, token.position, 0, 4));
      EXPECT_EQ(layer.topk[2 * t + 1], topkFor(token.sequence, token.position, 1, 4));
    }
  }
}

TEST_F(CaptureTest, ARankWithoutRowsStillHoldsTheLayer) {
  JobShape job;
  job.topk = true;
  std::vector<CaptureRankRecord> ranks = buildJob(job);
  // Rank 0 ran no microbatch of layer 1: its TP sibling's rows stand for replica 0, and the job's
  // top-k is still recorded for every microbatch that was run.
  layerOf(ranks, 0, 1).microbatches.clear();
  writeCapture(dir(), ranks);
  const Capture capture = loadCapture(dir());
  const CaptureLayer& layer = capture.layers[1];
  EXPECT_EQ(layer.ranks, (std::vector<int>{0, 1, 2, 3}));
  ASSERT_EQ(layer.tokens.size(), 16u);
  ASSERT_EQ(layer.topk.size(), 32u);
  EXPECT_EQ(layer.topk[2 * 6 + 1], topkFor(1, 2, 1, 4));
  EXPECT_EQ(layer.grads[0][0], gradFor(0, 1, 0, 0));
  // Rows of replica 0 come from rank 1's file.
  const auto* rank1 = static_cast<const std::uint8_t*>(capture.mappings[1].get());
  EXPECT_GE(layer.row_data[0], rank1);
  EXPECT_LT(layer.row_data[0], rank1 + fs::file_size(fileOf(1)));
}

TEST_F(CaptureTest, PipelineStagesHoldTheirOwnLayers) {
  JobShape job;
  job.dp_size = 1;
  job.tp_size = 1;
  job.pp_size = 2;
  job.layers = {3, 8};  // global indices need not start at 0
  writeCapture(dir(), buildJob(job));
  const Capture capture = loadCapture(dir());
  ASSERT_EQ(capture.layers.size(), 2u);
  EXPECT_EQ(capture.layers[0].layer, 3);
  EXPECT_EQ(capture.layers[0].ranks, std::vector<int>{0});
  EXPECT_EQ(capture.layers[1].layer, 8);
  EXPECT_EQ(capture.layers[1].ranks, std::vector<int>{1});
  EXPECT_EQ(capture.rank_manifests[1].layers, std::vector<int>{8});
  EXPECT_EQ(capture.layers[1].grads.at(0)[0], gradFor(1, 8, 0, 0));
  EXPECT_EQ(capture.layers[0].tokens.size(), 8u);  // 2 microbatches x 4 positions
  EXPECT_EQ(capture.layers[1].tokens.size(), 8u);
}

TEST_F(CaptureTest, ContextParallelRanksHoldDisjointPositions) {
  JobShape job;
  job.dp_size = 1;
  job.tp_size = 1;
  job.cp_size = 2;
  writeCapture(dir(), buildJob(job));
  const Capture capture = loadCapture(dir());
  const CaptureLayer& layer = capture.layers[0];
  ASSERT_EQ(layer.tokens.size(), 8u);
  std::vector<double> rows(8 * 3);
  layer.readRows(0, 8, rows.data());
  for (int t = 0; t < 8; ++t) {
    EXPECT_EQ(layer.tokens[t].sequence, t / 4);
    EXPECT_EQ(layer.tokens[t].position, t % 4);
    EXPECT_EQ(layer.tokens[t].microbatch, t / 4);
    EXPECT_EQ(rows[t * 3 + 2], inputFor(0, t / 4, t % 4, 2));
    // Odd positions come from the second CP rank's file.
    const auto* begin = static_cast<const std::uint8_t*>(capture.mappings[t % 2].get());
    EXPECT_GE(layer.row_data[t], begin);
    EXPECT_LT(layer.row_data[t], begin + fs::file_size(fileOf(t % 2)));
  }
}

TEST_F(CaptureTest, ManifestDefaultsAreFilledIn) {
  writeCapture(dir(), buildJob(JobShape{}));
  editAllManifests(dir_, 4, [](OrderedJson& m) {
    for (const char* key : {"tp", "ep", "ep_size"}) m["mesh"].erase(key);
    m["mesh"]["tp_size"] = 2;  // the sizes must still multiply to the world
    for (const char* key :
         {"z_loss_coeff", "z_loss_scope", "norm_topk_prob", "exclude_padding", "group_weighting"})
      m["objective"].erase(key);
    m.erase("framework");
    m.erase("created_by");
  });
  // tp defaults to 0: ranks 1 and 3 said tp 1; without the key they are tp 0.
  const Capture capture = loadCapture(dir());
  const CaptureManifest& m = capture.rank_manifests[1];
  EXPECT_EQ(m.mesh.tp, 0);
  EXPECT_EQ(m.mesh.ep, 0);
  EXPECT_EQ(m.mesh.ep_size, 1);
  EXPECT_EQ(m.objective.z_coeff, 0.0);
  EXPECT_EQ(m.objective.z_scope, ZLossScope::kMicroBatch);
  EXPECT_FALSE(m.objective.norm_topk_prob);
  EXPECT_TRUE(m.objective.exclude_padding);
  EXPECT_EQ(m.objective.group_weighting, GroupWeighting::kUniform);
  EXPECT_FALSE(m.objective.compute_dtype_given);
  EXPECT_EQ(m.objective.compute_dtype, DType::kFloat32);  // the gradients are F32
  EXPECT_EQ(m.framework, "");
  EXPECT_EQ(m.created_by, "");
}

TEST_F(CaptureTest, EveryOptionalValueIsRead) {
  std::vector<CaptureRankRecord> ranks = buildJob(JobShape{});
  for (CaptureRankRecord& rank : ranks) {
    CaptureObjective& o = rank.manifest.objective;
    o.aux_scope = AuxScope::kSequence;
    o.z_coeff = 0.001;
    o.z_scope = ZLossScope::kGlobalBatch;
    o.score = ScoreFunction::kSigmoid;
    o.norm_topk_prob = true;
    o.exclude_padding = false;
    o.group_weighting = GroupWeighting::kTokens;
    o.compute_dtype = DType::kBFloat16;
    o.compute_dtype_given = true;
    rank.manifest.mesh.ep_size = 2;
    rank.manifest.mesh.ep = rank.manifest.rank % 2;
  }
  writeCapture(dir(), ranks);
  const Capture capture = loadCapture(dir());
  const CaptureObjective& o = capture.manifest.objective;
  EXPECT_EQ(o.aux_scope, AuxScope::kSequence);
  EXPECT_EQ(o.z_coeff, 0.001);
  EXPECT_EQ(o.z_scope, ZLossScope::kGlobalBatch);
  EXPECT_EQ(o.score, ScoreFunction::kSigmoid);
  EXPECT_TRUE(o.norm_topk_prob);
  EXPECT_FALSE(o.exclude_padding);
  EXPECT_EQ(o.group_weighting, GroupWeighting::kTokens);
  EXPECT_TRUE(o.compute_dtype_given);
  EXPECT_EQ(o.compute_dtype, DType::kBFloat16);
  EXPECT_EQ(capture.rank_manifests[3].mesh.ep, 1);
  EXPECT_EQ(capture.rank_manifests[3].mesh.ep_size, 2);
}

TEST_F(CaptureTest, ComputeDtypeDefaultsToTheCoarsestGradientDtype) {
  struct Case {
    std::vector<CaptureFloat> grad_dtypes;  // per rank
    DType expected;
  };
  const Case cases[] = {
      {{CaptureFloat::kF64, CaptureFloat::kF64, CaptureFloat::kF64, CaptureFloat::kF64}, DType::kFloat64},
      {{CaptureFloat::kF32, CaptureFloat::kF32, CaptureFloat::kF32, CaptureFloat::kF32}, DType::kFloat32},
      {{CaptureFloat::kBF16, CaptureFloat::kBF16, CaptureFloat::kBF16, CaptureFloat::kBF16},
       DType::kBFloat16},
      {{CaptureFloat::kF16, CaptureFloat::kF16, CaptureFloat::kF16, CaptureFloat::kF16}, DType::kBFloat16},
      {{CaptureFloat::kF64, CaptureFloat::kF32, CaptureFloat::kF64, CaptureFloat::kF64}, DType::kFloat32},
      {{CaptureFloat::kF32, CaptureFloat::kF32, CaptureFloat::kBF16, CaptureFloat::kF64}, DType::kBFloat16},
  };
  for (const Case& c : cases) {
    std::vector<CaptureRankRecord> ranks = buildJob(JobShape{});
    for (int r = 0; r < 4; ++r) ranks[r].grad_dtype = c.grad_dtypes[r];
    fs::remove_all(dir_);
    writeCapture(dir(), ranks);
    const Capture capture = loadCapture(dir());
    for (const CaptureManifest& m : capture.rank_manifests) EXPECT_EQ(m.objective.compute_dtype, c.expected);
    EXPECT_EQ(capture.manifest.objective.compute_dtype, c.expected);
    EXPECT_EQ(capture.layers[0].grad_dtype, c.grad_dtypes[0]);
    // Every value of the test job is exact in every dtype.
    EXPECT_EQ(capture.layers[1].grads[2][5], gradFor(2, 1, 1, 2));
  }
}

TEST_F(CaptureTest, EveryFloatDtypeAndBoolValidityRead) {
  for (CaptureFloat dtype :
       {CaptureFloat::kF64, CaptureFloat::kF32, CaptureFloat::kBF16, CaptureFloat::kF16}) {
    std::vector<CaptureRankRecord> ranks = buildJob(JobShape{});
    for (CaptureRankRecord& rank : ranks) {
      rank.input_dtype = rank.weight_dtype = rank.grad_dtype = dtype;
      rank.valid_as_bool = true;
    }
    fs::remove_all(dir_);
    writeCapture(dir(), ranks);
    EXPECT_EQ(readSafetensorsFile(fileOf(0)).tensors.at(0).dtype, toString(dtype));
    const Capture capture = loadCapture(dir());
    const CaptureLayer& layer = capture.layers[1];
    EXPECT_EQ(layer.row_dtype[0], dtype);
    EXPECT_EQ(layer.weight[7], weightFor(1, 2, 1));
    std::vector<double> rows(16 * 3);
    layer.readRows(0, 16, rows.data());
    for (int t = 0; t < 16; ++t) EXPECT_EQ(rows[t * 3 + 1], inputFor(1, t / 4, t % 4, 1)) << toString(dtype);
    EXPECT_FALSE(layer.tokens[15].valid);
    EXPECT_TRUE(layer.tokens[14].valid);
  }
}

TEST_F(CaptureTest, TensorParallelCopiesAreMergedAndTheLowestRankIsReferenced) {
  writeCapture(dir(), buildJob(JobShape{}));
  const Capture capture = loadCapture(dir());
  const CaptureLayer& layer = capture.layers[0];
  // Ranks 0 and 1 (replica 0) both recorded sequences 0 and 1; the rows point into rank 0's file.
  const auto* rank0 = static_cast<const std::uint8_t*>(capture.mappings[0].get());
  const auto* rank2 = static_cast<const std::uint8_t*>(capture.mappings[2].get());
  for (int t = 0; t < 16; ++t) {
    const auto* base = t < 8 ? rank0 : rank2;
    const int r = t < 8 ? 0 : 2;
    EXPECT_GE(layer.row_data[t], base) << t;
    EXPECT_LT(layer.row_data[t], base + fs::file_size(fileOf(r))) << t;
  }
}

TEST_F(CaptureTest, CopiesWithinFourUlpsAreTheSame) {
  std::vector<CaptureRankRecord> ranks = buildJob(JobShape{});
  // Rank 1's copy of token (0, 1) and its layer-0 weight, 4 ulps of F32 away from rank 0's.
  CaptureMicrobatchRecord& mb = mbOf(ranks, 1, 0, 0);
  const std::size_t row = rowOf(mb, 0, 1);
  mb.input[row * 3 + 2] = f32Ulps(mb.input[row * 3 + 2], 4);
  layerOf(ranks, 1, 0).weight[5] = f32Ulps(layerOf(ranks, 1, 0).weight[5], 4);
  // Rank 3's copy in bfloat16: 4 ulps of BF16 at 1.0 (2^-7 each) above rank 2's 1.0.
  for (CaptureRankRecord& rank : ranks)
    rank.input_dtype = rank.manifest.rank == 3 ? CaptureFloat::kBF16 : CaptureFloat::kF32;
  CaptureMicrobatchRecord& mb2 = mbOf(ranks, 2, 0, 0);
  CaptureMicrobatchRecord& mb3 = mbOf(ranks, 3, 0, 0);
  mb2.input[rowOf(mb2, 2, 0) * 3] = 1.0;
  mb3.input[rowOf(mb3, 2, 0) * 3] = 1.0 + 4.0 / 128;
  writeCapture(dir(), ranks);
  const Capture capture = loadCapture(dir());
  // The lowest rank's values are the reference.
  std::vector<double> row_values(3);
  capture.layers[0].readRows(1, 1, row_values.data());
  EXPECT_EQ(row_values[2], inputFor(0, 0, 1, 2));
  capture.layers[0].readRows(8, 1, row_values.data());
  EXPECT_EQ(row_values[0], 1.0);
  EXPECT_EQ(capture.layers[0].weight[5], weightFor(0, 1, 2));
}

TEST_F(CaptureTest, ReadRowsRefusesRowsOutsideTheTokens) {
  writeCapture(dir(), buildJob(JobShape{}));
  const Capture capture = loadCapture(dir());
  std::vector<double> out(17 * 3);
  EXPECT_THROW(capture.layers[0].readRows(0, 17, out.data()), std::out_of_range);
  EXPECT_THROW(capture.layers[0].readRows(-1, 1, out.data()), std::out_of_range);
  EXPECT_THROW(capture.layers[0].readRows(16, 1, out.data()), std::out_of_range);
  EXPECT_NO_THROW(capture.layers[0].readRows(16, 0, out.data()));
}

TEST_F(CaptureTest, MappingsOutliveTheFilesNames) {
  writeCapture(dir(), buildJob(JobShape{}));
  const Capture capture = loadCapture(dir());
  fs::remove_all(dir_);  // the mapped pages stay readable while the Capture lives
  std::vector<double> row(3);
  capture.layers[1].readRows(3, 1, row.data());
  EXPECT_EQ(row[0], inputFor(1, 0, 3, 0));
}

// ================================================================ the writer

TEST_F(CaptureTest, WriterWritesEveryManifestKeyAndTheTensorTable) {
  JobShape job;
  job.topk = true;
  job.expert_bias = true;
  std::vector<CaptureRankRecord> ranks = buildJob(job);
  ranks[0].weight_dtype = CaptureFloat::kF64;
  ranks[0].grad_dtype = CaptureFloat::kBF16;
  ranks[0].bias_dtype = CaptureFloat::kF16;
  ranks[0].valid_as_bool = true;
  writeCapture(dir(), ranks);
  const SafetensorsFile file = readSafetensorsFile(fileOf(0));
  ASSERT_EQ(file.metadata.size(), 1u);
  const OrderedJson manifest = OrderedJson::parse(file.metadata.at("moe_lbcheck_capture"));
  // The keys of the format's manifest, in its order.
  std::vector<std::string> keys;
  for (const auto& item : manifest.items()) keys.push_back(item.key());
  EXPECT_EQ(keys, (std::vector<std::string>{"schema_version", "rank", "world_size", "mesh", "layers",
                                            "seq_len", "objective", "router_inputs_detached",
                                            "main_loss_scale", "framework", "created_by"}));
  EXPECT_EQ(manifest["mesh"], OrderedJson::parse(R"({"dp": 0, "dp_size": 2, "cp": 0, "cp_size": 1, "pp": 0,
      "pp_size": 1, "tp": 0, "tp_size": 2, "ep": 0, "ep_size": 1, "microbatches": 2})"));
  EXPECT_EQ(manifest["objective"], OrderedJson::parse(R"({"aux_type": "micro_batch", "coeff": 0.01,
      "z_loss_coeff": 0.0, "z_loss_scope": "micro_batch", "top_k": 2, "score": "softmax",
      "norm_topk_prob": false, "exclude_padding": true, "group_weighting": "uniform"})"));
  EXPECT_EQ(manifest["schema_version"], 1);
  EXPECT_EQ(manifest["router_inputs_detached"], true);
  EXPECT_EQ(manifest["main_loss_scale"], 0.0);
  EXPECT_EQ(manifest["layers"], OrderedJson::parse("[0, 1]"));

  std::map<std::string, std::pair<std::string, std::vector<std::int64_t>>> seen;
  for (const NamedTensor& t : file.tensors) seen[t.name] = {t.dtype, t.shape};
  EXPECT_EQ(seen.size(), 2u * (3 + 2 * 5));
  using Entry = std::pair<std::string, std::vector<std::int64_t>>;
  EXPECT_EQ(seen.at("layer0.weight"), (Entry{"F64", {4, 3}}));
  EXPECT_EQ(seen.at("layer0.weight.grad"), (Entry{"BF16", {4, 3}}));
  EXPECT_EQ(seen.at("layer1.expert_bias"), (Entry{"F16", {4}}));
  EXPECT_EQ(seen.at("layer1.mb1.input"), (Entry{"F32", {4, 3}}));
  EXPECT_EQ(seen.at("layer1.mb1.sequence"), (Entry{"I64", {4}}));
  EXPECT_EQ(seen.at("layer1.mb1.position"), (Entry{"I64", {4}}));
  EXPECT_EQ(seen.at("layer1.mb1.valid"), (Entry{"BOOL", {4}}));
  EXPECT_EQ(seen.at("layer0.mb0.topk"), (Entry{"I64", {4, 2}}));

  // compute_dtype appears only when given.
  ranks[0].manifest.objective.compute_dtype_given = true;
  ranks[0].manifest.objective.compute_dtype = DType::kFloat64;
  writeCaptureRank(fileOf(0), ranks[0]);
  EXPECT_EQ(OrderedJson::parse(readSafetensorsFile(fileOf(0)).metadata.at(
                "moe_lbcheck_capture"))["objective"]["compute_dtype"],
            "float64");
}

TEST_F(CaptureTest, WriterRejectsVectorsThatDoNotMatchTheirShapes) {
  std::vector<CaptureRankRecord> ranks = buildJob(JobShape{});
  CaptureRankRecord bad = ranks[0];
  bad.layers[0].weight.pop_back();
  EXPECT_THROW(writeCaptureRank(fileOf(0), bad), std::invalid_argument);
  bad = ranks[0];
  bad.layers[0].microbatches[0].input.push_back(0.0);
  EXPECT_THROW(writeCaptureRank(fileOf(0), bad), std::invalid_argument);
  bad = ranks[0];
  bad.layers[0].microbatches[0].valid.pop_back();
  EXPECT_THROW(writeCaptureRank(fileOf(0), bad), std::invalid_argument);
  bad = ranks[0];
  bad.layers[0].microbatches[0].topk = {1, 2, 3};  // 4 rows need 4 x top_k = 8
  EXPECT_THROW(writeCaptureRank(fileOf(0), bad), std::invalid_argument);
  EXPECT_FALSE(fs::exists(fileOf(0)));
}

TEST_F(CaptureTest, ManifestTextRoundTrips) {
  CaptureManifest m = buildJob(JobShape{})[3].manifest;
  m.objective.compute_dtype = DType::kBFloat16;
  m.objective.compute_dtype_given = true;
  m.main_loss_scale = -0.0;  // -0 is 0
  const CaptureManifest back = parseCaptureManifest(captureManifestToJson(m), "m.json", 3);
  EXPECT_EQ(captureManifestToJson(back), captureManifestToJson(m));
  EXPECT_EQ(back.rank, 3);
  EXPECT_EQ(back.mesh.dp, 1);
  EXPECT_EQ(back.mesh.tp, 1);
  EXPECT_EQ(back.objective.compute_dtype, DType::kBFloat16);
}

TEST_F(CaptureTest, StringsThatReadLikeNonFiniteNumbersStayStrings) {
  std::vector<CaptureRankRecord> ranks = buildJob(JobShape{});
  for (CaptureRankRecord& rank : ranks) {
    rank.manifest.framework = "NaN Infinity -Infinity 1e999";
    rank.manifest.created_by = "a \"quoted\" NaN, then \\\" and Infinity";
  }
  writeCapture(dir(), ranks);
  const Capture capture = loadCapture(dir());
  EXPECT_EQ(capture.manifest.framework, "NaN Infinity -Infinity 1e999");
  EXPECT_EQ(capture.manifest.created_by, "a \"quoted\" NaN, then \\\" and Infinity");
}

// ================================================================ files and directories

TEST_F(CaptureTest, MissingDirectoryOrAFileInsteadOfADirectory) {
  expectRejected("", "", {"a capture directory", "does not exist"});
  spit(dir_, "not a directory");
  expectRejected("", "", {"a capture directory", "got a file"});
}

TEST_F(CaptureTest, UnreadableRankFile) {
  writeCapture(dir(), buildJob(JobShape{}));
  fs::permissions(fileOf(2), fs::perms::none);
  if (::access(fileOf(2).c_str(), R_OK) == 0) {
    GTEST_SKIP() << "running with permission to read a mode-000 file (root): cannot test it";
  }
  expectRejected("rank2.safetensors", "", {"a readable safetensors file", "Permission denied"});
}

TEST_F(CaptureTest, OtherFilesInTheDirectoryAreIgnored) {
  writeCapture(dir(), buildJob(JobShape{}));
  spit(dir_ / "README.txt", "notes");
  spit(dir_ / "rank0.safetensors.tmp", "partial");
  spit(dir_ / "Rank5.safetensors", "other case");
  fs::create_directories(dir_ / "logs");
  EXPECT_EQ(loadCapture(dir()).world_size, 4);
}

// ================================================================ every rule, broken

enum class Base { kPlain, kTopkAndBias };

struct RejectCase {
  const char* label;
  Base base;
  std::function<void(std::vector<CaptureRankRecord>&)> edit_records;  // before writing; may be empty
  std::function<void(const fs::path&)> edit_files;                    // after writing; may be empty
  const char* file;     // relative to the capture directory; "" = the directory
  const char* pointer;  // the tensor or manifest key
  std::vector<std::string> fragments;
};
std::ostream& operator<<(std::ostream& os, const RejectCase& c) { return os << c.label; }

class CaptureRejectTest : public CaptureTest, public ::testing::WithParamInterface<RejectCase> {};

TEST_P(CaptureRejectTest, NamesFileKeyAndExpectation) {
  const RejectCase& c = GetParam();
  JobShape job;
  job.topk = job.expert_bias = c.base == Base::kTopkAndBias;
  std::vector<CaptureRankRecord> ranks = buildJob(job);
  if (c.edit_records) c.edit_records(ranks);
  writeCapture(dir(), ranks);
  if (c.edit_files) c.edit_files(dir_);
  expectRejected(c.file, c.pointer, c.fragments);
}

std::string testName(const ::testing::TestParamInfo<RejectCase>& info) { return info.param.label; }

using Records = std::vector<CaptureRankRecord>;
using Tensors = std::vector<NamedTensor>;
const auto kNoRecordEdit = std::function<void(Records&)>();
const auto kNoFileEdit = std::function<void(const fs::path&)>();

// clang-format off
const RejectCase kFileCases[] = {
    {"missing_rank_file", Base::kPlain, kNoRecordEdit, [](const fs::path& d) { fs::remove(rankPath(d, 2)); },
     "rank2.safetensors", "", {"world_size is 4 (rank0.safetensors /world_size)", "this one is missing"}},
    {"missing_rank0", Base::kPlain, kNoRecordEdit, [](const fs::path& d) { fs::remove(rankPath(d, 0)); },
     "rank0.safetensors", "", {"missing; the lowest rank file is rank1.safetensors"}},
    {"extra_rank_file", Base::kPlain, kNoRecordEdit,
     [](const fs::path& d) { fs::copy_file(rankPath(d, 3), rankPath(d, 4)); }, "rank4.safetensors", "",
     {"no file beyond rank 3: world_size is 4", "got rank 4"}},
    {"zero_padded_name", Base::kPlain, kNoRecordEdit,
     [](const fs::path& d) { fs::rename(rankPath(d, 1), d / "rank01.safetensors"); }, "rank01.safetensors",
     "",
     {"without zero padding", "got \"rank01.safetensors\""}},
    {"letters_in_name", Base::kPlain, kNoRecordEdit,
     [](const fs::path& d) { fs::copy_file(rankPath(d, 1), d / "rank1b.safetensors"); },
     "rank1b.safetensors", "",
     {"no other file may match rank*.safetensors"}},
    {"no_rank_number", Base::kPlain, kNoRecordEdit,
     [](const fs::path& d) { spit(d / "rank.safetensors", ""); }, "rank.safetensors", "",
     {"rank{R}.safetensors"}},
    {"negative_rank_name", Base::kPlain, kNoRecordEdit,
     [](const fs::path& d) { spit(d / "rank-1.safetensors", ""); }, "rank-1.safetensors", "",
     {"R = 0, 1, 2"}},
    {"no_rank_files", Base::kPlain, kNoRecordEdit,
     [](const fs::path& d) {
       for (int r = 0; r < 4; ++r) fs::remove(rankPath(d, r));
     },
     "", "", {"found no file named rank*.safetensors"}},
    {"empty_file", Base::kPlain, kNoRecordEdit, [](const fs::path& d) { spit(rankPath(d, 1), ""); },
     "rank1.safetensors", "", {"at least 8 bytes", "has 0"}},
    {"rank_file_is_a_directory", Base::kPlain, kNoRecordEdit,
     [](const fs::path& d) {
       fs::remove(rankPath(d, 1));
       fs::create_directories(rankPath(d, 1));
     },
     "rank1.safetensors", "", {"got a directory"}},
    {"truncated_file", Base::kPlain, kNoRecordEdit,
     [](const fs::path& d) {
       const std::string bytes = slurp(rankPath(d, 3));
       spit(rankPath(d, 3), bytes.substr(0, bytes.size() - 1));
     },
     "rank3.safetensors", "/layer1.mb1.valid/data_offsets", {"(the data buffer size), got ["}},
    {"header_length_past_the_end", Base::kPlain, kNoRecordEdit,
     [](const fs::path& d) {
       std::string bytes = slurp(rankPath(d, 1));
       bytes[5] = '\x01';  // header length += 2^40
       spit(rankPath(d, 1), bytes);
     },
     "rank1.safetensors", "", {"a header length within the file"}},
    {"header_not_json", Base::kPlain, kNoRecordEdit,
     [](const fs::path& d) {
       std::string bytes = slurp(rankPath(d, 1));
       bytes[8] = '[';
       spit(rankPath(d, 1), bytes);
     },
     "rank1.safetensors", "", {"a JSON header", "invalid JSON"}},
    {"header_offsets_overlap", Base::kPlain, kNoRecordEdit,
     [](const fs::path& d) {
       editHeader(d, 2,
       [](OrderedJson& h) { h["layer0.weight.grad"]["data_offsets"] = h["layer0.weight"]["data_offsets"]; });
     },
     "rank2.safetensors", "/layer0.weight.grad/data_offsets", {"overlaps tensor \"layer0.weight\""}},
    {"header_offsets_run_past_the_end", Base::kPlain, kNoRecordEdit,
     [](const fs::path& d) {
       editHeader(d, 0, [](OrderedJson& h) {
         h["layer0.mb0.input"]["data_offsets"] = OrderedJson::array({1u << 20, (1u << 20) + 48});
       });
     },
     "rank0.safetensors", "/layer0.mb0.input/data_offsets",
     {"(the data buffer size), got [1048576, 1048624]"}},
    {"declared_shape_too_large_to_allocate", Base::kPlain, kNoRecordEdit,
     [](const fs::path& d) {
       editHeader(d, 0, [](OrderedJson& h) {
         h["layer0.mb0.input"]["shape"] = OrderedJson::array({1ull << 40, 1ull << 40});
       });
     },
     "rank0.safetensors", "/layer0.mb0.input/shape", {"element count fits in 64 bits"}},
    {"declared_shape_beyond_the_file", Base::kPlain, kNoRecordEdit,
     [](const fs::path& d) {
       editHeader(d, 0, [](OrderedJson& h) {
         h["layer0.mb0.input"]["shape"] = OrderedJson::array({1u << 20, 1u << 20});
         h["layer0.mb0.input"]["data_offsets"] = OrderedJson::array({0, 1ull << 42});
       });
     },
     "rank0.safetensors", "/layer0.mb0.input/data_offsets",
     {"(the data buffer size), got [0, 4398046511104]"}},
    {"tensor_dtype_unknown_to_safetensors", Base::kPlain, kNoRecordEdit,
     [](const fs::path& d) { editHeader(d, 1, [](OrderedJson& h) { h["layer0.weight"]["dtype"] = "F24"; }); },
     "rank1.safetensors", "/layer0.weight/dtype", {"a known dtype", "\"F24\""}},
};
// clang-format on
INSTANTIATE_TEST_SUITE_P(CaptureFiles, CaptureRejectTest, ::testing::ValuesIn(kFileCases), testName);

// Manifest edits: on one rank file (rank 0 unless the label says otherwise) or on all of them.
std::function<void(const fs::path&)> onManifest(int rank, std::function<void(OrderedJson&)> edit) {
  return [rank, edit](const fs::path& d) { editManifest(d, rank, edit); };
}
std::function<void(const fs::path&)> onAllManifests(std::function<void(OrderedJson&)> edit) {
  return [edit](const fs::path& d) { editAllManifests(d, 4, edit); };
}
std::function<void(const fs::path&)> onManifestText(int rank, std::string from, std::string to) {
  return [rank, from, to](const fs::path& d) {
    editManifestText(d, rank, [&](std::string& t) { replaceOnce(t, from, to); });
  };
}

// clang-format off
const RejectCase kManifestCases[] = {
    {"no_manifest", Base::kPlain, kNoRecordEdit,
     [](const fs::path& d) {
       editFile(d, 1, [](Tensors&, std::map<std::string, std::string>& meta) { meta.clear(); });
     },
     "rank1.safetensors", "/__metadata__/moe_lbcheck_capture", {"the capture manifest", "missing"}},
    {"other_metadata_key", Base::kPlain, kNoRecordEdit,
     [](const fs::path& d) {
       editFile(d, 0, [](Tensors&, std::map<std::string, std::string>& meta) { meta["format"] = "pt"; });
     },
     "rank0.safetensors", "/__metadata__/format", {"only the key \"moe_lbcheck_capture\"", "got \"format\""}},
    {"manifest_not_json", Base::kPlain, kNoRecordEdit,
     [](const fs::path& d) { editManifestText(d, 0, [](std::string& t) { t = "{\"schema_version\": 1,"; }); },
     "rank0.safetensors", "/__metadata__/moe_lbcheck_capture", {"the capture manifest, one JSON object",
     "invalid JSON at line 1"}},
    {"manifest_an_array", Base::kPlain, kNoRecordEdit,
     [](const fs::path& d) { editManifestText(d, 0, [](std::string& t) { t = "[1, 2]"; }); },
     "rank0.safetensors",
     "", {"a JSON object as the manifest, got an array"}},
    {"schema_version_2", Base::kPlain,
     kNoRecordEdit, onManifest(0, [](OrderedJson& m) { m["schema_version"] = 2; }),
     "rank0.safetensors", "/schema_version", {"schema_version 1", "got 2"}},
    {"schema_version_missing", Base::kPlain,
     kNoRecordEdit, onManifest(0, [](OrderedJson& m) { m.erase("schema_version"); }),
     "rank0.safetensors", "/schema_version", {"required key \"schema_version\"", "missing"}},
    {"unknown_top_level_key", Base::kPlain,
     kNoRecordEdit, onManifest(2, [](OrderedJson& m) { m["bogus"] = 1; }),
     "rank2.safetensors", "/bogus",
     {"unknown key \"bogus\"; allowed keys: schema_version, rank, world_size, mesh, layers, seq_len, "
      "objective, router_inputs_detached, main_loss_scale, framework, created_by"}},
    {"unknown_key_near_miss", Base::kPlain,
     kNoRecordEdit, onManifest(0, [](OrderedJson& m) { m["seqlen"] = 4; }),
     "rank0.safetensors", "/seqlen", {"(did you mean \"seq_len\"?)"}},
    {"unknown_mesh_key", Base::kPlain,
     kNoRecordEdit, onManifest(1, [](OrderedJson& m) { m["mesh"]["dp_szie"] = 2; }),
     "rank1.safetensors", "/mesh/dp_szie", {"unknown key \"dp_szie\" (did you mean \"dp_size\"?)",
     "allowed keys in /mesh"}},
    {"unknown_objective_key", Base::kPlain, kNoRecordEdit,
     onManifest(0, [](OrderedJson& m) { m["objective"]["alpha"] = 0.01; }), "rank0.safetensors",
     "/objective/alpha",
     {"unknown key \"alpha\"", "allowed keys in /objective: aux_type, coeff"}},
    {"duplicate_key", Base::kPlain,
     kNoRecordEdit, onManifestText(0, "\"seq_len\":4", "\"seq_len\":4,\"seq_len\":4"),
     "rank0.safetensors", "/seq_len", {"\"seq_len\" appears twice"}},
    {"duplicate_nested_key", Base::kPlain, kNoRecordEdit,
     onManifestText(3, "\"microbatches\":2", "\"microbatches\":2,\"microbatches\":3"), "rank3.safetensors",
     "/mesh/microbatches", {"\"microbatches\" appears twice"}},
    {"nan_literal", Base::kPlain, kNoRecordEdit, onManifestText(0, "\"coeff\":0.01", "\"coeff\":NaN"),
     "rank0.safetensors", "/objective/coeff", {"a finite number >= 0, got NaN"}},
    {"infinity_literal", Base::kPlain, kNoRecordEdit,
     onManifestText(0, "\"main_loss_scale\":0.0", "\"main_loss_scale\":Infinity"), "rank0.safetensors",
     "/main_loss_scale", {"a finite number, got Infinity"}},
    {"negative_infinity_as_integer", Base::kPlain,
     kNoRecordEdit, onManifestText(0, "\"seq_len\":4", "\"seq_len\":-Infinity"),
     "rank0.safetensors", "/seq_len", {"an integer >= 1, got -Infinity"}},
    {"number_overflowing_a_double", Base::kPlain, kNoRecordEdit,
     onManifestText(0, "\"z_loss_coeff\":0.0", "\"z_loss_coeff\":1e999"), "rank0.safetensors",
     "/objective/z_loss_coeff", {"a finite number >= 0, got 1e999"}},
    {"nan_as_string_value", Base::kPlain, kNoRecordEdit,
     onManifestText(0, "\"framework\":\"unit test\"", "\"framework\":NaN"), "rank0.safetensors", "/framework",
     {"a string, got NaN"}},
    {"rank_not_the_file_name", Base::kPlain,
     kNoRecordEdit, onManifest(1, [](OrderedJson& m) { m["rank"] = 2; }),
     "rank1.safetensors", "/rank", {"1, the R of the file name rank1.safetensors, got 2"}},
    {"rank_beyond_world", Base::kPlain, kNoRecordEdit, onManifest(3, [](OrderedJson& m) { m["rank"] = 7; }),
     "rank3.safetensors", "/rank", {"an integer in [0, world_size = 4), got 7"}},
    {"rank_a_string", Base::kPlain, kNoRecordEdit, onManifest(0, [](OrderedJson& m) { m["rank"] = "0"; }),
     "rank0.safetensors", "/rank", {"got \"0\""}},
    {"world_not_the_mesh_product", Base::kPlain,
     kNoRecordEdit, onAllManifests([](OrderedJson& m) { m["world_size"] = 8; }),
     "rank0.safetensors", "/world_size",
     {"dp_size * cp_size * pp_size * tp_size = 2 * 1 * 1 * 2", "ep is carved out", "got 8"}},
    {"tp_size_left_out", Base::kPlain, kNoRecordEdit,
     onAllManifests([](OrderedJson& m) {
       m["mesh"].erase("tp_size");
       m["mesh"].erase("tp");
     }),
     "rank0.safetensors", "/world_size", {"= 2 * 1 * 1 * 1", "got 4"}},
    {"world_size_differs", Base::kPlain, kNoRecordEdit,
     onManifest(1, [](OrderedJson& m) {
       m["world_size"] = 2;
       m["mesh"]["dp_size"] = 1;
     }),
     "rank1.safetensors", "/world_size",
     {"the same value in every rank file, rank0.safetensors has 4, got 2"}},
    {"coordinate_beyond_size", Base::kPlain,
     kNoRecordEdit, onManifest(2, [](OrderedJson& m) { m["mesh"]["dp"] = 2; }),
     "rank2.safetensors", "/mesh/dp", {"an integer in [0, dp_size = 2), got 2"}},
    {"negative_coordinate", Base::kPlain,
     kNoRecordEdit, onManifest(0, [](OrderedJson& m) { m["mesh"]["cp"] = -1; }),
     "rank0.safetensors", "/mesh/cp", {"an integer in [0, cp_size = 1), got -1"}},
    {"ep_beyond_ep_size", Base::kPlain,
     kNoRecordEdit, onManifest(0, [](OrderedJson& m) { m["mesh"]["ep"] = 1; }),
     "rank0.safetensors", "/mesh/ep", {"an integer in [0, ep_size = 1), got 1"}},
    {"size_zero", Base::kPlain,
     kNoRecordEdit, onManifest(0, [](OrderedJson& m) { m["mesh"]["pp_size"] = 0; }),
     "rank0.safetensors", "/mesh/pp_size", {"an integer >= 1, got 0"}},
    {"size_fraction", Base::kPlain,
     kNoRecordEdit, onManifest(0, [](OrderedJson& m) { m["mesh"]["dp_size"] = 2.5; }),
     "rank0.safetensors", "/mesh/dp_size", {"an integer >= 1, got 2.5"}},
    {"mesh_key_missing", Base::kPlain,
     kNoRecordEdit, onManifest(0, [](OrderedJson& m) { m["mesh"].erase("pp"); }),
     "rank0.safetensors", "/mesh/pp", {"required key \"pp\"", "missing"}},
    {"microbatches_zero", Base::kPlain, kNoRecordEdit,
     onManifest(0, [](OrderedJson& m) { m["mesh"]["microbatches"] = 0; }), "rank0.safetensors",
     "/mesh/microbatches",
     {"an integer >= 1, got 0"}},
    {"mesh_not_an_object", Base::kPlain, kNoRecordEdit, onManifest(0, [](OrderedJson& m) { m["mesh"] = 4; }),
     "rank0.safetensors", "/mesh", {"an object, got 4"}},
    {"layers_not_an_array", Base::kPlain,
     kNoRecordEdit, onManifest(0, [](OrderedJson& m) { m["layers"] = 0; }),
     "rank0.safetensors", "/layers", {"an array of distinct layer indices >= 0, got 0"}},
    {"layer_twice", Base::kPlain,
     kNoRecordEdit, onManifest(0, [](OrderedJson& m) { m["layers"] = {1, 0, 1}; }),
     "rank0.safetensors", "/layers/2", {"distinct layer indices, got layer 1 twice"}},
    {"nan_in_layers", Base::kPlain,
     kNoRecordEdit, onManifestText(0, "\"layers\":[0,1]", "\"layers\":[0,NaN]"),
     "rank0.safetensors", "/layers/1", {"an integer >= 0, got NaN"}},
    {"layer_negative", Base::kPlain,
     kNoRecordEdit, onManifest(0, [](OrderedJson& m) { m["layers"] = {0, -1}; }),
     "rank0.safetensors", "/layers/1", {"an integer >= 0, got -1"}},
    {"seq_len_zero", Base::kPlain, kNoRecordEdit, onAllManifests([](OrderedJson& m) { m["seq_len"] = 0; }),
     "rank0.safetensors", "/seq_len", {"an integer >= 1, got 0"}},
    {"objective_missing", Base::kPlain,
     kNoRecordEdit, onManifest(0, [](OrderedJson& m) { m.erase("objective"); }),
     "rank0.safetensors", "/objective", {"an object (required key \"objective\"), missing"}},
    {"aux_type_missing", Base::kPlain, kNoRecordEdit,
     onManifest(0, [](OrderedJson& m) { m["objective"].erase("aux_type"); }), "rank0.safetensors",
     "/objective/aux_type", {"required key \"aux_type\"", "missing"}},
    {"aux_type_near_miss", Base::kPlain, kNoRecordEdit,
     onManifest(0, [](OrderedJson& m) { m["objective"]["aux_type"] = "microbatch"; }), "rank0.safetensors",
     "/objective/aux_type",
     {"one of \"micro_batch\", \"sequence\", \"global_batch\", got \"microbatch\" "
       "(did you mean \"micro_batch\"?)"}},
    {"coeff_negative", Base::kPlain,
     kNoRecordEdit, onManifest(0, [](OrderedJson& m) { m["objective"]["coeff"] = -0.5; }),
     "rank0.safetensors", "/objective/coeff", {"a finite number >= 0, got -0.5"}},
    {"coeff_missing", Base::kPlain,
     kNoRecordEdit, onManifest(0, [](OrderedJson& m) { m["objective"].erase("coeff"); }),
     "rank0.safetensors", "/objective/coeff", {"required key \"coeff\""}},
    {"top_k_zero", Base::kPlain,
     kNoRecordEdit, onManifest(0, [](OrderedJson& m) { m["objective"]["top_k"] = 0; }),
     "rank0.safetensors", "/objective/top_k", {"an integer >= 1, got 0"}},
    {"top_k_missing", Base::kPlain,
     kNoRecordEdit, onManifest(0, [](OrderedJson& m) { m["objective"].erase("top_k"); }),
     "rank0.safetensors", "/objective/top_k", {"required key \"top_k\""}},
    {"score_unknown", Base::kPlain,
     kNoRecordEdit, onManifest(0, [](OrderedJson& m) { m["objective"]["score"] = "relu"; }),
     "rank0.safetensors", "/objective/score", {"one of \"softmax\", \"sigmoid\", got \"relu\""}},
    {"score_missing", Base::kPlain,
     kNoRecordEdit, onManifest(0, [](OrderedJson& m) { m["objective"].erase("score"); }),
     "rank0.safetensors", "/objective/score", {"required key \"score\""}},
    {"z_loss_scope_sequence", Base::kPlain, kNoRecordEdit,
     onManifest(0, [](OrderedJson& m) { m["objective"]["z_loss_scope"] = "sequence"; }), "rank0.safetensors",
     "/objective/z_loss_scope", {"one of \"micro_batch\", \"global_batch\", got \"sequence\""}},
    {"group_weighting_preset", Base::kPlain, kNoRecordEdit,
     onManifest(0, [](OrderedJson& m) { m["objective"]["group_weighting"] = "preset"; }), "rank0.safetensors",
     "/objective/group_weighting", {"one of \"uniform\", \"tokens\", got \"preset\""}},
    {"norm_topk_prob_integer", Base::kPlain, kNoRecordEdit,
     onManifest(0, [](OrderedJson& m) { m["objective"]["norm_topk_prob"] = 1; }), "rank0.safetensors",
     "/objective/norm_topk_prob", {"true or false, got 1"}},
    {"exclude_padding_string", Base::kPlain, kNoRecordEdit,
     onManifest(0, [](OrderedJson& m) { m["objective"]["exclude_padding"] = "yes"; }), "rank0.safetensors",
     "/objective/exclude_padding", {"true or false, got \"yes\""}},
    {"compute_dtype_float16", Base::kPlain, kNoRecordEdit,
     onManifest(0, [](OrderedJson& m) { m["objective"]["compute_dtype"] = "float16"; }), "rank0.safetensors",
     "/objective/compute_dtype", {"one of \"float64\", \"float32\", \"bfloat16\", got \"float16\""}},
    {"router_inputs_not_detached", Base::kPlain, kNoRecordEdit,
     onManifest(0, [](OrderedJson& m) { m["router_inputs_detached"] = false; }), "rank0.safetensors",
     "/router_inputs_detached", {"true (the router inputs detached", "got false"}},
    {"router_inputs_detached_missing", Base::kPlain, kNoRecordEdit,
     onManifest(0, [](OrderedJson& m) { m.erase("router_inputs_detached"); }), "rank0.safetensors",
     "/router_inputs_detached", {"required key \"router_inputs_detached\""}},
    {"router_inputs_detached_string", Base::kPlain, kNoRecordEdit,
     onManifest(0, [](OrderedJson& m) { m["router_inputs_detached"] = "true"; }), "rank0.safetensors",
     "/router_inputs_detached", {"true or false, got \"true\""}},
    {"main_loss_not_zeroed", Base::kPlain,
     kNoRecordEdit, onManifest(0, [](OrderedJson& m) { m["main_loss_scale"] = 1.0; }),
     "rank0.safetensors", "/main_loss_scale", {"0 (the main loss multiplied by 0 before backward",
     "got 1.0"}},
    {"main_loss_scale_missing", Base::kPlain,
     kNoRecordEdit, onManifest(0, [](OrderedJson& m) { m.erase("main_loss_scale"); }),
     "rank0.safetensors", "/main_loss_scale", {"required key \"main_loss_scale\""}},
    {"framework_not_a_string", Base::kPlain,
     kNoRecordEdit, onManifest(0, [](OrderedJson& m) { m["framework"] = 5; }),
     "rank0.safetensors", "/framework", {"a string, got 5"}},
    {"created_by_not_a_string", Base::kPlain,
     kNoRecordEdit, onManifest(0, [](OrderedJson& m) { m["created_by"] = {1}; }),
     "rank0.safetensors", "/created_by", {"a string, got an array"}},
    // The values every rank file shares.
    {"seq_len_differs", Base::kPlain, kNoRecordEdit, onManifest(3, [](OrderedJson& m) { m["seq_len"] = 8; }),
     "rank3.safetensors", "/seq_len", {"the same value in every rank file, rank0.safetensors has 4, got 8"}},
    {"microbatches_differ", Base::kPlain, kNoRecordEdit,
     onManifest(2, [](OrderedJson& m) { m["mesh"]["microbatches"] = 3; }), "rank2.safetensors",
     "/mesh/microbatches",
     {"rank0.safetensors has 2, got 3"}},
    {"coeff_differs", Base::kPlain,
     kNoRecordEdit, onManifest(2, [](OrderedJson& m) { m["objective"]["coeff"] = 0.02; }),
     "rank2.safetensors", "/objective/coeff", {"rank0.safetensors has 0.01, got 0.02"}},
    {"score_differs", Base::kPlain, kNoRecordEdit,
     onManifest(1, [](OrderedJson& m) { m["objective"]["score"] = "sigmoid"; }), "rank1.safetensors",
     "/objective/score", {"rank0.safetensors has softmax, got sigmoid"}},
    {"default_and_explicit_value_differ", Base::kPlain, kNoRecordEdit,
     onManifest(1, [](OrderedJson& m) { m["objective"]["exclude_padding"] = false; }), "rank1.safetensors",
     "/objective/exclude_padding", {"rank0.safetensors has true, got false"}},
    {"compute_dtype_on_one_rank_only", Base::kPlain, kNoRecordEdit,
     onManifest(1, [](OrderedJson& m) { m["objective"]["compute_dtype"] = "float32"; }), "rank1.safetensors",
     "/objective/compute_dtype", {"rank0.safetensors has absent (the gradient's dtype), got float32"}},
    {"pp_size_differs", Base::kPlain, kNoRecordEdit,
     onManifest(1, [](OrderedJson& m) {
       m["mesh"]["pp_size"] = 2;
       m["mesh"]["dp_size"] = 1;
     }),
     "rank1.safetensors", "/mesh/dp_size", {"rank0.safetensors has 2, got 1"}},
};
// clang-format on
INSTANTIATE_TEST_SUITE_P(CaptureManifest, CaptureRejectTest, ::testing::ValuesIn(kManifestCases), testName);

std::function<void(const fs::path&)> onTensors(int rank, std::function<void(Tensors&)> edit) {
  return [rank, edit](const fs::path& d) { editTensors(d, rank, edit); };
}

// clang-format off
const RejectCase kTensorCases[] = {
    {"unknown_tensor_name", Base::kPlain, kNoRecordEdit,
     onTensors(2, [](Tensors& t) { t.push_back(makeU8Tensor("optimizer.state", {1}, {0})); }),
     "rank2.safetensors",
     "/optimizer.state", {"a tensor name of the capture table", "got \"optimizer.state\""}},
    {"unknown_tensor_near_miss", Base::kPlain, kNoRecordEdit,
     onTensors(0, [](Tensors& t) { renameTensor(t, "layer1.mb0.input", "layer1.mb0.inputs"); }),
     "rank0.safetensors",
     "/layer1.mb0.inputs", {"(did you mean \"layer1.mb0.input\"?)"}},
    {"zero_padded_layer_index", Base::kPlain, kNoRecordEdit,
     onTensors(0, [](Tensors& t) { renameTensor(t, "layer1.weight", "layer01.weight"); }),
     "rank0.safetensors",
     "/layer01.weight", {"without zero padding", "(did you mean \"layer1.weight\"?)"}},
    {"layer_not_in_layers", Base::kPlain,
     kNoRecordEdit, onManifest(0, [](OrderedJson& m) { m["layers"] = {0}; }),
     "rank0.safetensors", "/layer1.weight", {"a tensor of a layer in this rank's /layers [0], got layer 1"}},
    {"huge_layer_index", Base::kPlain, kNoRecordEdit,
     onTensors(0,
     [](Tensors& t) { t.push_back(makeU8Tensor("layer99999999999999999999999.weight", {1}, {0})); }),
     "rank0.safetensors", "/layer99999999999999999999999.weight",
     {"/layers [0, 1], got layer 9223372036854775807"}},
    {"microbatch_index_too_large", Base::kPlain, kNoRecordEdit,
     onTensors(1, [](Tensors& t) {
       for (const char* f : {"input", "sequence", "position", "valid"})
         renameTensor(t, std::string("layer0.mb1.") + f, std::string("layer0.mb2.") + f);
     }),
     "rank1.safetensors", "/layer0.mb2.input", {"a microbatch index m < /mesh/microbatches = 2, got m = 2"}},
    {"layer_listed_without_tensors", Base::kPlain, kNoRecordEdit,
     onManifest(3, [](OrderedJson& m) { m["layers"] = {0, 1, 2}; }), "rank3.safetensors", "/layer2.weight",
     {"the router weight [E, H]", "of layer 2, which /layers lists, missing"}},
    {"no_layer_anywhere", Base::kPlain,
     [](Records& ranks) {
       for (CaptureRankRecord& r : ranks) {
         r.layers.clear();
         r.manifest.layers.clear();
       }
     },
     kNoFileEdit, "", "/layers", {"at least one layer held by some rank"}},
    {"weight_missing", Base::kPlain,
     kNoRecordEdit, onTensors(1, [](Tensors& t) { removeTensor(t, "layer1.weight"); }),
     "rank1.safetensors", "/layer1.weight", {"the router weight", "missing"}},
    {"grad_missing", Base::kPlain,
     kNoRecordEdit, onTensors(1, [](Tensors& t) { removeTensor(t, "layer0.weight.grad"); }),
     "rank1.safetensors", "/layer0.weight.grad", {"the router weight's gradient [4, 3]", "missing"}},
    {"input_missing", Base::kPlain,
     kNoRecordEdit, onTensors(0, [](Tensors& t) { removeTensor(t, "layer0.mb1.input"); }),
     "rank0.safetensors", "/layer0.mb1.input", {"the router input rows [n, H]",
     "layer0.mb1.sequence is recorded", "missing"}},
    {"sequence_missing", Base::kPlain, kNoRecordEdit,
     onTensors(0, [](Tensors& t) { removeTensor(t, "layer0.mb1.sequence"); }), "rank0.safetensors",
     "/layer0.mb1.sequence", {"sequence indices [n] (I64)", "layer0.mb1.input is recorded", "missing"}},
    {"position_missing", Base::kPlain, kNoRecordEdit,
     onTensors(0, [](Tensors& t) { removeTensor(t, "layer0.mb0.position"); }), "rank0.safetensors",
     "/layer0.mb0.position", {"positions [n] (I64)", "missing"}},
    {"valid_missing", Base::kPlain,
     kNoRecordEdit, onTensors(0, [](Tensors& t) { removeTensor(t, "layer1.mb1.valid"); }),
     "rank0.safetensors", "/layer1.mb1.valid", {"validity [n] (U8 or BOOL)", "missing"}},
    {"only_topk_of_a_microbatch", Base::kPlain, kNoRecordEdit,
     onTensors(0, [](Tensors& t) {
       NamedTensor topk = tensorNamed(t, "layer0.mb1.sequence");
       topk.name = "layer0.mb1.topk";
       t.push_back(topk);
       for (const char* f : {"input", "sequence", "position", "valid"}) removeTensor(t,
       std::string("layer0.mb1.") + f);
     }),
     "rank0.safetensors", "/layer0.mb1.input", {"layer0.mb1.topk is recorded", "missing"}},
    {"weight_integer_dtype", Base::kPlain, kNoRecordEdit,
     onTensors(0, [](Tensors& t) { tensorNamed(t, "layer0.weight").dtype = "I32"; }), "rank0.safetensors",
     "/layer0.weight", {"dtype F64, F32, BF16 or F16, got I32"}},
    {"input_fp8_dtype", Base::kPlain, kNoRecordEdit,
     onTensors(0, [](Tensors& t) {
       NamedTensor& input = tensorNamed(t, "layer0.mb0.input");
       input.dtype = "F8_E4M3";
       input.bytes.resize(input.bytes.size() / 4);
     }),
     "rank0.safetensors", "/layer0.mb0.input", {"got F8_E4M3"}},
    {"sequence_i32", Base::kPlain, kNoRecordEdit,
     onTensors(0, [](Tensors& t) {
       NamedTensor& s = tensorNamed(t, "layer0.mb0.sequence");
       s.dtype = "I32";
       s.shape = {8};
     }),
     "rank0.safetensors", "/layer0.mb0.sequence", {"dtype I64, got I32"}},
    {"position_f64", Base::kPlain, kNoRecordEdit,
     onTensors(0, [](Tensors& t) { tensorNamed(t, "layer0.mb0.position").dtype = "F64"; }),
     "rank0.safetensors",
     "/layer0.mb0.position", {"dtype I64, got F64"}},
    {"valid_i8", Base::kPlain, kNoRecordEdit,
     onTensors(0, [](Tensors& t) { tensorNamed(t, "layer0.mb0.valid").dtype = "I8"; }), "rank0.safetensors",
     "/layer0.mb0.valid", {"dtype U8 or BOOL, got I8"}},
    {"weight_one_dimensional", Base::kPlain, kNoRecordEdit,
     onTensors(0, [](Tensors& t) { tensorNamed(t, "layer0.weight").shape = {12}; }), "rank0.safetensors",
     "/layer0.weight", {"shape [E, H] with 1 <= E, H < 2^31", "got [12]"}},
    {"weight_without_experts", Base::kPlain, kNoRecordEdit,
     onTensors(0, [](Tensors& t) {
       NamedTensor& w = tensorNamed(t, "layer0.weight");
       w.shape = {0, 3};
       w.bytes.clear();
     }),
     "rank0.safetensors", "/layer0.weight", {"got [0, 3]"}},
    {"grad_transposed", Base::kPlain, kNoRecordEdit,
     onTensors(2, [](Tensors& t) { tensorNamed(t, "layer1.weight.grad").shape = {3, 4}; }),
     "rank2.safetensors",
     "/layer1.weight.grad", {"shape [4, 3] (the shape of layer1.weight), got [3, 4]"}},
    {"input_of_another_hidden_size", Base::kPlain, kNoRecordEdit,
     onTensors(0, [](Tensors& t) { tensorNamed(t, "layer0.mb0.input").shape = {3, 4}; }), "rank0.safetensors",
     "/layer0.mb0.input", {"shape [n, 3] (n rows of hidden size H from layer0.weight), got [3, 4]"}},
    {"input_three_dimensional", Base::kPlain, kNoRecordEdit,
     onTensors(0, [](Tensors& t) { tensorNamed(t, "layer0.mb0.input").shape = {1, 4, 3}; }),
     "rank0.safetensors",
     "/layer0.mb0.input", {"got [1, 4, 3]"}},
    {"sequence_of_another_length", Base::kPlain, kNoRecordEdit,
     onTensors(0, [](Tensors& t) {
       NamedTensor& s = tensorNamed(t, "layer0.mb0.sequence");
       s.shape = {5};
       s.bytes.resize(40, 0);
     }),
     "rank0.safetensors", "/layer0.mb0.sequence",
     {"shape [4] (one entry per row of layer0.mb0.input [4, 3]), got [5]"}},
    {"position_two_dimensional", Base::kPlain, kNoRecordEdit,
     onTensors(0, [](Tensors& t) { tensorNamed(t, "layer0.mb1.position").shape = {4, 1}; }),
     "rank0.safetensors",
     "/layer0.mb1.position", {"shape [4] (one entry per row of layer0.mb1.input [4, 3]), got [4, 1]"}},
    {"valid_of_another_length", Base::kPlain, kNoRecordEdit,
     onTensors(0, [](Tensors& t) {
       NamedTensor& v = tensorNamed(t, "layer0.mb1.valid");
       v.shape = {3};
       v.bytes.pop_back();
     }),
     "rank0.safetensors", "/layer0.mb1.valid", {"shape [4]", "got [3]"}},
    {"topk_of_another_k", Base::kTopkAndBias, kNoRecordEdit,
     onTensors(0, [](Tensors& t) { tensorNamed(t, "layer0.mb0.topk").shape = {8, 1}; }), "rank0.safetensors",
     "/layer0.mb0.topk", {"shape [4, 2] (n rows of top_k = 2 expert indices), got [8, 1]"}},
    {"topk_not_i64", Base::kTopkAndBias, kNoRecordEdit,
     onTensors(0, [](Tensors& t) { tensorNamed(t, "layer0.mb0.topk").dtype = "F64"; }), "rank0.safetensors",
     "/layer0.mb0.topk", {"dtype I64, got F64"}},
    {"expert_bias_of_another_length", Base::kTopkAndBias, kNoRecordEdit,
     onTensors(1, [](Tensors& t) {
       NamedTensor& b = tensorNamed(t, "layer1.expert_bias");
       b.shape = {2, 2};
     }),
     "rank1.safetensors", "/layer1.expert_bias", {"shape [4] ([E], E from layer1.weight), got [2, 2]"}},
    {"top_k_above_experts", Base::kPlain,
     kNoRecordEdit, onAllManifests([](OrderedJson& m) { m["objective"]["top_k"] = 5; }),
     "rank0.safetensors", "/objective/top_k", {"top_k <= experts (E = 4 from layer0.weight [4, 3]), got 5"}},
    {"router_shape_differs_across_ranks", Base::kPlain,
     [](Records& ranks) {
       // Rank 2 records layer 1 with hidden size 4: consistent within its file, not with rank 0's.
       CaptureLayerRecord& layer = layerOf(ranks, 2, 1);
       layer.hidden = 4;
       layer.weight.assign(16, 0.25);
       layer.grad.assign(16, 0.5);
       for (CaptureMicrobatchRecord& mb : layer.microbatches) mb.input.assign(mb.sequence.size() * 4, 0.125);
     },
     kNoFileEdit, "rank2.safetensors", "/layer1.weight",
     {"shape [4, 3] as in rank0.safetensors (every rank holding layer 1 holds the same router), got [4, 4]"}},
};
// clang-format on
INSTANTIATE_TEST_SUITE_P(CaptureTensors, CaptureRejectTest, ::testing::ValuesIn(kTensorCases), testName);

const double kNaN = std::numeric_limits<double>::quiet_NaN();
const double kInf = std::numeric_limits<double>::infinity();

// clang-format off
const RejectCase kValueCases[] = {
    {"position_at_seq_len", Base::kPlain, [](Records& r) { mbOf(r, 1, 0, 0).position[2] = 4; }, kNoFileEdit,
     "rank1.safetensors", "/layer0.mb0.position", {"positions in [0, seq_len = 4), element 2 is 4"}},
    {"position_negative", Base::kPlain, [](Records& r) { mbOf(r, 0, 1, 1).position[0] = -3; }, kNoFileEdit,
     "rank0.safetensors", "/layer1.mb1.position", {"element 0 is -3"}},
    {"sequence_negative", Base::kPlain, [](Records& r) { mbOf(r, 3, 0, 1).sequence[3] = -1; }, kNoFileEdit,
     "rank3.safetensors", "/layer0.mb1.sequence", {"sequence indices >= 0, element 3 is -1"}},
    {"valid_neither_0_nor_1", Base::kPlain, [](Records& r) { mbOf(r, 0, 0, 0).valid[1] = 2; }, kNoFileEdit,
     "rank0.safetensors", "/layer0.mb0.valid", {"values 0 or 1, element 1 is 2"}},
    {"bool_valid_neither_0_nor_1", Base::kPlain,
     [](Records& r) {
       for (CaptureRankRecord& rank : r) rank.valid_as_bool = true;
       mbOf(r, 2, 1, 0).valid[3] = 255;
     },
     kNoFileEdit, "rank2.safetensors", "/layer1.mb0.valid", {"element 3 is 255"}},
    {"topk_expert_out_of_range", Base::kTopkAndBias,
     [](Records& r) { mbOf(r, 0, 1, 0).topk[3] = 4; }, kNoFileEdit,
     "rank0.safetensors", "/layer1.mb0.topk",
     {"expert indices in [0, E = 4), element (row 1, column 1) is 4"}},
    {"topk_expert_negative", Base::kTopkAndBias,
     [](Records& r) { mbOf(r, 0, 1, 0).topk[0] = -1; }, kNoFileEdit,
     "rank0.safetensors", "/layer1.mb0.topk", {"element (row 0, column 0) is -1"}},
    {"topk_expert_twice", Base::kTopkAndBias,
     [](Records& r) {
       CaptureMicrobatchRecord& mb = mbOf(r, 1, 0, 1);
       mb.topk[5] = mb.topk[4];
     },
     kNoFileEdit, "rank1.safetensors", "/layer0.mb1.topk",
     {"distinct experts within each row, row 2 lists expert"}},
    {"nan_in_input", Base::kPlain, [](Records& r) { mbOf(r, 2, 1, 0).input[5] = kNaN; }, kNoFileEdit,
     "rank2.safetensors", "/layer1.mb0.input", {"finite values, element (row 1, column 2) is NaN"}},
    {"inf_in_bf16_input", Base::kPlain,
     [](Records& r) {
       for (CaptureRankRecord& rank : r) rank.input_dtype = CaptureFloat::kBF16;
       mbOf(r, 0, 0, 1).input[0] = kInf;
     },
     kNoFileEdit, "rank0.safetensors", "/layer0.mb1.input", {"element (row 0, column 0) is inf"}},
    {"nan_in_f16_input", Base::kPlain,
     [](Records& r) {
       for (CaptureRankRecord& rank : r) rank.input_dtype = CaptureFloat::kF16;
       mbOf(r, 1, 1, 1).input[11] = kNaN;
     },
     kNoFileEdit, "rank1.safetensors", "/layer1.mb1.input", {"element (row 3, column 2) is NaN"}},
    {"f64_overflowing_f16", Base::kPlain,
     [](Records& r) {
       for (CaptureRankRecord& rank : r) rank.input_dtype = CaptureFloat::kF16;
       mbOf(r, 1, 1, 1).input[2] = 70000.0;  // beyond 65504: written as infinity
     },
     kNoFileEdit, "rank1.safetensors", "/layer1.mb1.input", {"element (row 0, column 2) is inf"}},
    {"inf_in_weight", Base::kPlain, [](Records& r) { layerOf(r, 3, 0).weight[0] = kInf; }, kNoFileEdit,
     "rank3.safetensors", "/layer0.weight", {"finite values, element (row 0, column 0) is inf"}},
    {"negative_inf_in_f64_grad", Base::kPlain,
     [](Records& r) {
       r[1].grad_dtype = CaptureFloat::kF64;
       layerOf(r, 1, 1).grad[11] = -kInf;
     },
     kNoFileEdit, "rank1.safetensors", "/layer1.weight.grad", {"element (row 3, column 2) is -inf"}},
    {"nan_in_expert_bias", Base::kTopkAndBias, [](Records& r) { layerOf(r, 0, 1).expert_bias[2] = kNaN; },
     kNoFileEdit, "rank0.safetensors", "/layer1.expert_bias", {"finite values, element 2 is NaN"}},
};
// clang-format on
INSTANTIATE_TEST_SUITE_P(CaptureValues, CaptureRejectTest, ::testing::ValuesIn(kValueCases), testName);

// clang-format off
const RejectCase kAssemblyCases[] = {
    {"topk_missing_on_one_rank", Base::kTopkAndBias,
     [](Records& r) {
       for (CaptureMicrobatchRecord& mb : layerOf(r, 2, 0).microbatches) mb.topk.clear();
     },
     kNoFileEdit, "rank2.safetensors", "/layer0.mb0.topk",
     {"a recorded top-k, as rank0.safetensors records layer0.mb0.topk", "or for none), missing"}},
    {"topk_missing_for_one_microbatch", Base::kTopkAndBias, [](Records& r) { mbOf(r, 3, 1, 1).topk.clear(); },
     kNoFileEdit, "rank3.safetensors", "/layer1.mb1.topk", {"as rank0.safetensors records layer1.mb0.topk"}},
    {"topk_only_on_a_later_rank", Base::kPlain,
     [](Records& r) {
       CaptureMicrobatchRecord& mb = mbOf(r, 3, 1, 0);
       for (std::size_t i = 0; i < mb.sequence.size(); ++i)
         for (int j = 0; j < 2; ++j) mb.topk.push_back(topkFor(mb.sequence[i], mb.position[i], j, 4));
     },
     kNoFileEdit, "rank0.safetensors", "/layer1.mb0.topk", {"as rank3.safetensors records layer1.mb0.topk"}},
    {"weights_differ_across_ranks", Base::kPlain,
     [](Records& r) { layerOf(r, 3, 1).weight[4] += 1.0; }, kNoFileEdit,
     "rank3.safetensors", "/layer1.weight",
     {"the same weight (a capture is of one step) as rank0.safetensors to 4 ulps of F32",
      "element (row 1, column 1) is"}},
    {"weights_five_ulps_apart", Base::kPlain,
     [](Records& r) { layerOf(r, 1, 0).weight[5] = f32Ulps(layerOf(r, 1, 0).weight[5], 5); }, kNoFileEdit,
     "rank1.safetensors", "/layer0.weight", {"element (row 1, column 2)", "(5.0 ulps apart)"}},
    {"weights_differ_across_dtypes", Base::kPlain,
     [](Records& r) {
       r[2].weight_dtype = CaptureFloat::kBF16;
       layerOf(r, 2, 0).weight[0] += 0.25;  // the values are exact in BF16: 0.25 is far above 4 of its ulps
     },
     kNoFileEdit, "rank2.safetensors", "/layer0.weight", {"to 4 ulps of F32/BF16",
     "element (row 0, column 0)"}},
    {"expert_bias_on_some_ranks_only", Base::kTopkAndBias,
     [](Records& r) { layerOf(r, 2, 1).expert_bias.clear(); },
     kNoFileEdit, "rank2.safetensors", "/layer1.expert_bias",
     {"an expert bias, as rank0.safetensors records one", "missing"}},
    {"expert_bias_differs", Base::kTopkAndBias,
     [](Records& r) { layerOf(r, 1, 0).expert_bias[3] = 9.0; }, kNoFileEdit,
     "rank1.safetensors", "/layer0.expert_bias", {"the same expert bias",
     "element 3 is 9.0 here and 1.0 there"}},
    {"token_inputs_differ", Base::kPlain,
     [](Records& r) {
       CaptureMicrobatchRecord& mb = mbOf(r, 1, 0, 0);
       mb.input[rowOf(mb, 0, 1) * 3 + 2] += 0.5;
     },
     kNoFileEdit, "rank1.safetensors", "/layer0.mb0.input",
     {"the same input (to 4 ulps of F32) for a token recorded by several ranks",
      "token (sequence 0, position 1) is recorded by rank0.safetensors layer0.mb0.input row 2 and by "
      "rank1.safetensors layer0.mb0.input row 2",
      "element 2 is -0.375 there and 0.125 here"}},
    {"token_inputs_five_ulps_apart", Base::kPlain,
     [](Records& r) {
       CaptureMicrobatchRecord& mb = mbOf(r, 3, 1, 1);
       const std::size_t row = rowOf(mb, 3, 2);
       mb.input[row * 3] = f32Ulps(mb.input[row * 3], 5);
     },
     kNoFileEdit, "rank3.safetensors", "/layer1.mb1.input", {"token (sequence 3, position 2)",
     "(5.0 ulps apart)"}},
    {"token_inputs_five_bf16_ulps_apart", Base::kPlain,
     [](Records& r) {
       for (CaptureRankRecord& rank : r) rank.input_dtype = CaptureFloat::kBF16;
       CaptureMicrobatchRecord& mb2 = mbOf(r, 2, 0, 0);
       CaptureMicrobatchRecord& mb3 = mbOf(r, 3, 0, 0);
       mb2.input[rowOf(mb2, 2, 0) * 3] = 1.0;
       mb3.input[rowOf(mb3, 2, 0) * 3] = 1.0 + 5.0 / 128;
     },
     kNoFileEdit, "rank3.safetensors", "/layer0.mb0.input", {"to 4 ulps of BF16",
     "1.0 there and 1.0390625 here"}},
    {"token_validity_differs", Base::kPlain,
     [](Records& r) {
       CaptureMicrobatchRecord& mb = mbOf(r, 1, 1, 1);
       mb.valid[rowOf(mb, 1, 0)] = 0;
     },
     kNoFileEdit, "rank1.safetensors", "/layer1.mb1.valid",
     {"the same validity for a token recorded by several ranks", "token (sequence 1, position 0)",
      "valid 1 there and 0 here"}},
    {"token_in_two_replicas", Base::kPlain,
     [](Records& r) {
       // Ranks 2 and 3 (replica 1) record token (0, 0), which replica 0 holds.
       for (int rank : {2, 3}) {
         CaptureMicrobatchRecord& mb = mbOf(r, rank, 0, 0);
         const std::size_t row = rowOf(mb, 2, 0);
         mb.sequence[row] = 0;
         for (int c = 0; c < 3; ++c) mb.input[row * 3 + c] = inputFor(0, 0, 0, c);
       }
     },
     kNoFileEdit, "rank2.safetensors", "/layer0.mb0.sequence",
     {"the same (mesh.dp, microbatch)", "(dp 0, microbatch 0) there and (dp 1, microbatch 0) here"}},
    {"token_in_two_microbatches", Base::kPlain,
     [](Records& r) {
       // Rank 1 files its two microbatches under each other's index.
       std::swap(layerOf(r, 1, 0).microbatches[0].microbatch, layerOf(r, 1, 0).microbatches[1].microbatch);
     },
     kNoFileEdit, "rank1.safetensors", "/layer0.mb1.sequence",
     {"token (sequence 0, position 0)", "(dp 0, microbatch 0) there and (dp 0, microbatch 1) here"}},
    {"token_topk_differs", Base::kTopkAndBias,
     [](Records& r) {
       CaptureMicrobatchRecord& mb = mbOf(r, 1, 0, 0);
       const std::size_t row = rowOf(mb, 0, 3);  // experts {3, 0}
       mb.topk[row * 2] = 2;
     },
     kNoFileEdit, "rank1.safetensors", "/layer0.mb0.topk",
     {"the same recorded top-k", "token (sequence 0, position 3)", "experts {0, 3} there and {0, 2} here"}},
    {"token_twice_in_one_rank", Base::kPlain,
     [](Records& r) {
       CaptureMicrobatchRecord& mb = mbOf(r, 0, 0, 1);  // sequence 1; its position-2 row becomes (0, 2)
       mb.sequence[rowOf(mb, 1, 2)] = 0;
     },
     kNoFileEdit, "rank0.safetensors", "/layer0.mb1.position",
     {"each token at most once per rank", "token (sequence 0, position 2) is recorded by rank0.safetensors "
      "layer0.mb0.input row 1 and again by rank0.safetensors layer0.mb1.input row 1"}},
    {"token_twice_in_one_microbatch", Base::kPlain,
     [](Records& r) {
       CaptureMicrobatchRecord& mb = mbOf(r, 2, 1, 0);
       mb.position[rowOf(mb, 2, 1)] = 0;
     },
     kNoFileEdit, "rank2.safetensors", "/layer1.mb0.position",
     {"token (sequence 2, position 0) is recorded by rank2.safetensors layer1.mb0.input row 2 and again by "
      "rank2.safetensors layer1.mb0.input row 3"}},
    {"token_missing_from_a_layer", Base::kPlain,
     [](Records& r) {
       for (int rank : {2, 3}) {
         CaptureMicrobatchRecord& mb = mbOf(r, rank, 1, 1);
         removeRow(mb, rowOf(mb, 3, 1), 3, 2);
       }
     },
     kNoFileEdit, "rank2.safetensors", "/layer1.mb1.sequence",
     {"the same token set in every layer, but token (sequence 3, position 1) of layer 0 "
      "(dp 1, microbatch 1) is "
      "recorded by no rank holding layer 1 (ranks 0, 1, 2, 3)"}},
    {"token_only_in_a_later_layer", Base::kPlain,
     [](Records& r) {
       for (int rank : {0, 1}) {
         CaptureMicrobatchRecord& mb = mbOf(r, rank, 0, 0);
         removeRow(mb, rowOf(mb, 0, 0), 3, 2);
       }
     },
     kNoFileEdit, "rank0.safetensors", "/layer0.mb0.sequence",
     {"token (sequence 0, position 0) of layer 1 (dp 0, microbatch 0) is recorded by no rank holding "
       "layer 0"}},
    {"layer_without_tokens", Base::kPlain,
     [](Records& r) {
       for (CaptureRankRecord& rank : r)
         for (CaptureLayerRecord& layer : rank.layers)
           if (layer.layer == 1) layer.microbatches.clear();
     },
     kNoFileEdit, "rank0.safetensors", "/layer1.mb0.input",
     {"router input rows of layer 1 from at least one rank, but no rank holding it records any"}},
};
// clang-format on
INSTANTIATE_TEST_SUITE_P(CaptureAssembly, CaptureRejectTest, ::testing::ValuesIn(kAssemblyCases), testName);

// ================================================================ float formats

TEST(CaptureFloatFormats, KnownBitPatterns) {
  struct Known {
    std::uint16_t bits;
    double value;
  };
  // binary16: sign 1, exponent 5 (bias 15), fraction 10.
  const Known f16[] = {
      {0x0000, 0.0},
      {0x3c00, 1.0},
      {0xc000, -2.0},
      {0x3555, 0.333251953125},
      {0x7bff, 65504.0},
      {0x0001, 5.9604644775390625e-08} /* 2^-24 */,
      {0x03ff, 6.097555160522461e-05},
      {0x0400, 6.103515625e-05} /* 2^-14 */,
      {0x3bff, 0.99951171875},
      {0xfbff, -65504.0},
  };
  for (const Known& k : f16)
    EXPECT_EQ(static_cast<double>(f16ToFloat(k.bits)), k.value) << std::hex << k.bits;
  EXPECT_TRUE(std::signbit(f16ToFloat(0x8000)));
  EXPECT_EQ(f16ToFloat(0x8000), 0.0f);
  EXPECT_EQ(f16ToFloat(0x7c00), std::numeric_limits<float>::infinity());
  EXPECT_EQ(f16ToFloat(0xfc00), -std::numeric_limits<float>::infinity());
  EXPECT_TRUE(std::isnan(f16ToFloat(0x7e00)));
  EXPECT_TRUE(std::isnan(f16ToFloat(0x7c01)));
  // bfloat16: sign 1, exponent 8 (bias 127), fraction 7.
  const Known bf16[] = {
      {0x0000, 0.0},
      {0x3f80, 1.0},
      {0xc000, -2.0},
      {0x4049, 3.140625},
      {0x3eab, 0.333984375},
      {0x7f7f, 3.3895313892515355e+38},
      {0x0001, 9.183549615799121e-41} /* 2^-133 */,
      {0x0080, 1.1754943508222875e-38} /* 2^-126 */,
  };
  for (const Known& k : bf16)
    EXPECT_EQ(static_cast<double>(bf16ToFloat(k.bits)), k.value) << std::hex << k.bits;
  EXPECT_EQ(bf16ToFloat(0x7f80), std::numeric_limits<float>::infinity());
  EXPECT_TRUE(std::isnan(bf16ToFloat(0x7fc0)));
}

// Every finite pattern of both types: strictly increasing over the positive patterns (the
// conversion is monotone and loses nothing), symmetric in the sign, and the writer's rounding
// (separate code: ldexp and nearbyint, not bit shifts) maps each value back to its pattern.
TEST(CaptureFloatFormats, EveryPatternRoundTripsExactly) {
  struct Format {
    const char* name;
    float (*decode)(std::uint16_t);
    std::uint16_t (*encode)(double);
    std::uint16_t infinity;
  };
  for (const Format& f :
       {Format{"F16", f16ToFloat, doubleToF16, 0x7c00}, Format{"BF16", bf16ToFloat, doubleToBf16, 0x7f80}}) {
    double previous = -1.0;
    for (std::uint32_t bits = 0; bits < f.infinity; ++bits) {
      const double value = f.decode(static_cast<std::uint16_t>(bits));
      ASSERT_GT(value, previous) << f.name << " " << bits;
      previous = value;
      ASSERT_EQ(f.encode(value), bits) << f.name << " " << value;
      ASSERT_EQ(static_cast<double>(f.decode(static_cast<std::uint16_t>(bits | 0x8000))), -value) << f.name;
      ASSERT_EQ(f.encode(-value), bits | 0x8000) << f.name;
    }
    EXPECT_EQ(f.decode(f.infinity), std::numeric_limits<float>::infinity()) << f.name;
  }
}

#if defined(__FLT16_MAX__)
// The compiler's own binary16 type as an independent oracle, on every pattern.
TEST(CaptureFloatFormats, F16AgreesWithTheCompilersFloat16) {
  for (std::uint32_t bits = 0; bits <= 0xffff; ++bits) {
    const auto pattern = static_cast<std::uint16_t>(bits);
    _Float16 half;
    std::memcpy(&half, &pattern, 2);
    const float expected = static_cast<float>(half);
    const float got = f16ToFloat(pattern);
    if (std::isnan(expected)) {
      EXPECT_TRUE(std::isnan(got)) << bits;
    } else {
      ASSERT_EQ(std::memcmp(&got, &expected, 4), 0) << bits;  // bit-exact, signed zero included
    }
  }
}
#endif

TEST(CaptureFloatFormats, RoundingToNearestEven) {
  // bfloat16 at 1.0 has spacing 2^-7; halfway cases go to the even fraction.
  EXPECT_EQ(doubleToBf16(1.0 + 0x1p-8), 0x3f80);            // tie -> 1.0 (fraction 0)
  EXPECT_EQ(doubleToBf16(1.0 + 3 * 0x1p-8), 0x3f82);        // tie -> fraction 2, not 1
  EXPECT_EQ(doubleToBf16(1.0 + 0x1p-8 + 0x1p-30), 0x3f81);  // above the tie
  EXPECT_EQ(doubleToBf16(3.4e38), 0x7f80);                  // beyond max + half a spacing: infinity
  EXPECT_EQ(doubleToBf16(0x1p-134), 0x0000);                // half the least subnormal: tie -> 0
  EXPECT_EQ(doubleToBf16(3 * 0x1p-134), 0x0002);            // tie -> 2 units
  EXPECT_EQ(doubleToBf16(-0.0), 0x8000);
  EXPECT_EQ(doubleToBf16(std::numeric_limits<double>::quiet_NaN()) & 0x7fc0, 0x7fc0);
  // binary16: max 65504; 65520 is halfway to 65536 (not representable): infinity.
  EXPECT_EQ(doubleToF16(65519.0), 0x7bff);
  EXPECT_EQ(doubleToF16(65520.0), 0x7c00);
  EXPECT_EQ(doubleToF16(-1e10), 0xfc00);
  EXPECT_EQ(doubleToF16(0x1p-25), 0x0000);
  EXPECT_EQ(doubleToF16(3 * 0x1p-25), 0x0002);
  EXPECT_EQ(doubleToF16(0x1p-14 - 0x1p-25), 0x0400);  // the largest subnormal + half: rounds up to 2^-14
  EXPECT_EQ(doubleToF16(2049.0), 0x6800);             // spacing 2 at 2048: tie -> 2048
  EXPECT_EQ(doubleToF16(2051.0), 0x6802);             // tie -> 2052
}

TEST(CaptureFloatFormats, UlpDistanceAndSpacing) {
  const auto f32Bytes = [](std::initializer_list<float> values) {
    std::vector<std::uint8_t> bytes;
    for (float v : values) {
      std::uint32_t bits;
      std::memcpy(&bits, &v, 4);
      for (int b = 0; b < 4; ++b) bytes.push_back(static_cast<std::uint8_t>(bits >> (8 * b)));
    }
    return bytes;
  };
  const float one_up = std::nextafter(1.0f, 2.0f);
  const float tiny = std::numeric_limits<float>::denorm_min();
  const std::vector<std::uint8_t> a = f32Bytes({1.0f, 0.0f, tiny, 2.0f, -1.0f});
  const std::vector<std::uint8_t> b = f32Bytes({one_up, -0.0f, -tiny, std::nextafter(2.0f, 0.0f), -1.0f});
  EXPECT_EQ(ulpDistance(a.data(), b.data(), 0, CaptureFloat::kF32), 1u);
  EXPECT_EQ(ulpDistance(a.data(), b.data(), 1, CaptureFloat::kF32), 0u);  // +0 and -0
  EXPECT_EQ(ulpDistance(a.data(), b.data(), 2, CaptureFloat::kF32), 2u);  // across zero
  EXPECT_EQ(ulpDistance(a.data(), b.data(), 3, CaptureFloat::kF32), 1u);  // across a binade
  EXPECT_EQ(ulpDistance(a.data(), b.data(), 4, CaptureFloat::kF32), 0u);
  const std::uint8_t bf_a[] = {0x80, 0x3f}, bf_b[] = {0x84, 0x3f};  // 1.0 and 1.0 + 4 * 2^-7
  EXPECT_EQ(ulpDistance(bf_a, bf_b, 0, CaptureFloat::kBF16), 4u);
  EXPECT_EQ(ulpOf(CaptureFloat::kF32, 1.0), 0x1p-23);
  EXPECT_EQ(ulpOf(CaptureFloat::kF32, 1.5), 0x1p-23);
  EXPECT_EQ(ulpOf(CaptureFloat::kBF16, -3.0), 0x1p-6);
  EXPECT_EQ(ulpOf(CaptureFloat::kF16, 1000.0), 0.5);
  EXPECT_EQ(ulpOf(CaptureFloat::kF64, 1.0), 0x1p-52);
  EXPECT_EQ(ulpOf(CaptureFloat::kF16, 0.0), 0x1p-24);  // the subnormal spacing
  EXPECT_EQ(ulpOf(CaptureFloat::kF32, 1e-45), 0x1p-149);
}

TEST(CaptureFloatFormats, FirstNonFiniteFindsTheFirstOfManyInEveryDtype) {
  for (CaptureFloat dtype :
       {CaptureFloat::kF64, CaptureFloat::kF32, CaptureFloat::kBF16, CaptureFloat::kF16}) {
    // Long enough for the block path (1024 elements) and a tail.
    std::vector<double> values(2500, 1.5);
    std::vector<std::uint8_t> bytes;
    appendEncoded(bytes, values.data(), values.size(), dtype);
    EXPECT_EQ(firstNonFinite(bytes.data(), values.size(), dtype), -1) << toString(dtype);
    for (std::size_t at : {std::size_t{0}, std::size_t{1023}, std::size_t{1500}, std::size_t{2499}}) {
      values.assign(2500, -65504.0);  // the largest finite F16 magnitude
      values[at] =
          at % 2 ? std::numeric_limits<double>::quiet_NaN() : -std::numeric_limits<double>::infinity();
      if (at == 1500) values[2100] = std::numeric_limits<double>::infinity();
      bytes.clear();
      appendEncoded(bytes, values.data(), values.size(), dtype);
      EXPECT_EQ(firstNonFinite(bytes.data(), values.size(), dtype), static_cast<std::int64_t>(at))
          << toString(dtype);
    }
  }
}

TEST(CaptureFloatFormats, Names) {
  EXPECT_STREQ(toString(CaptureFloat::kF64), "F64");
  EXPECT_STREQ(toString(CaptureFloat::kF32), "F32");
  EXPECT_STREQ(toString(CaptureFloat::kBF16), "BF16");
  EXPECT_STREQ(toString(CaptureFloat::kF16), "F16");
  CaptureFloat parsed{};
  EXPECT_TRUE(parseCaptureFloat("BF16", parsed));
  EXPECT_EQ(parsed, CaptureFloat::kBF16);
  EXPECT_FALSE(parseCaptureFloat("bf16", parsed));
  EXPECT_FALSE(parseCaptureFloat("F8_E4M3", parsed));
}

}  // namespace
}  // namespace moe
