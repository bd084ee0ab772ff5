// safetensors reader/writer: round trip, byte layout, every malformed-file case, and the problem
// data loaded from / dumped to a file.
#include <gtest/gtest.h>
#include <unistd.h>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <memory>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>
#include <vector>

#include "../file_utils.hpp"
#include "../reference_problem.hpp"
#include "common/errors.hpp"
#include "data/problem.hpp"
#include "data/problem_io.hpp"
#include "data/safetensors.hpp"

namespace moe {
namespace {

namespace fs = std::filesystem;

class SafetensorsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
    dir_ = fs::temp_directory_path() / ("moe_safetensors_test_" + std::to_string(::getpid()) + "_" +
                                        info->test_suite_name() + "_" + info->name());
    fs::remove_all(dir_);
    fs::create_directories(dir_);
  }
  void TearDown() override { fs::remove_all(dir_); }

  std::string pathOf(const std::string& name) const { return (dir_ / name).string(); }

  static std::string slurp(const std::string& path) { return test::readText(path); }
  static void spit(const std::string& path, const std::string& bytes) { test::writeText(path, bytes); }

  // A hand-made file: little-endian u64 length (header.size() unless overridden), header, data.
  std::string rawFile(const std::string& name, const std::string& header, const std::string& data,
                      std::int64_t declared_length = -1) const {
    std::string bytes;
    const std::uint64_t length = declared_length < 0 ? header.size() : static_cast<std::uint64_t>(declared_length);
    for (int i = 0; i < 8; ++i) bytes.push_back(static_cast<char>((length >> (8 * i)) & 0xff));
    bytes += header;
    bytes += data;
    spit(pathOf(name), bytes);
    return pathOf(name);
  }

  // Runs readSafetensors on `path`, expecting an InputError whose message contains every needle;
  // returns the error's JSON path.
  static std::string expectInputError(const std::string& path, std::vector<std::string> needles) {
    try {
      readSafetensors(path);
    } catch (const InputError& e) {
      const std::string message = e.what();
      EXPECT_EQ(e.file(), path);
      EXPECT_EQ(e.code(), ExitCode::kInvalidInput);
      for (const std::string& needle : needles) {
        EXPECT_NE(message.find(needle), std::string::npos) << "message: " << message << "\nmissing: " << needle;
      }
      return e.jsonPath();
    }
    ADD_FAILURE() << "no InputError for " << path;
    return "<none>";
  }

  fs::path dir_;
};

using SafetensorsFormat = SafetensorsTest;
using SafetensorsMalformed = SafetensorsTest;
using SafetensorsProblem = SafetensorsTest;
using SafetensorsMapped = SafetensorsTest;

// ================================================================ format

TEST_F(SafetensorsFormat, RoundTrip) {
  const std::vector<double> values = {1.5, -2.25, 0.0, 1e-300, -0.0, 3.141592653589793};
  NamedTensor f32{"f32", "F32", {2}, {0x00, 0x00, 0xc0, 0x3f, 0x00, 0x00, 0x00, 0xc0}};  // 1.5f, -2.0f
  const std::vector<NamedTensor> written = {
      makeF64Tensor("weights.f64", {2, 3}, values),
      makeU8Tensor("mask", {3}, {1, 0, 1}),
      f32,
      makeF64Tensor("scalar", {}, {42.0}),
      makeF64Tensor("empty", {0, 4}, {}),
  };
  writeSafetensors(pathOf("t.safetensors"), written, {{"origin", "unit test"}, {"version", "1"}});

  const SafetensorsFile file = readSafetensorsFile(pathOf("t.safetensors"));
  EXPECT_EQ(file.metadata.at("origin"), "unit test");
  EXPECT_EQ(file.metadata.at("version"), "1");
  ASSERT_EQ(file.tensors.size(), written.size());
  // File order is write order (the zero-size tensor sits at the end of the buffer).
  for (std::size_t i = 0; i < written.size(); ++i) {
    EXPECT_EQ(file.tensors[i].name, written[i].name);
    EXPECT_EQ(file.tensors[i].dtype, written[i].dtype);
    EXPECT_EQ(file.tensors[i].shape, written[i].shape);
    EXPECT_EQ(file.tensors[i].bytes, written[i].bytes);
  }
  const std::vector<double> back = tensorAsF64(file.tensors[0], "t");
  ASSERT_EQ(back.size(), values.size());
  for (std::size_t i = 0; i < values.size(); ++i) {
    EXPECT_EQ(std::memcmp(&back[i], &values[i], sizeof(double)), 0) << i;  // bit-exact, -0.0 included
  }
  EXPECT_EQ(tensorAsF64(file.tensors[2], "t"), (std::vector<double>{1.5, -2.0}));
  EXPECT_EQ(tensorAsF64(file.tensors[3], "t"), std::vector<double>{42.0});
  EXPECT_TRUE(tensorAsF64(file.tensors[4], "t").empty());
  // No temp file left next to it.
  EXPECT_EQ(std::distance(fs::directory_iterator(dir_), fs::directory_iterator()), 1);
}

TEST_F(SafetensorsFormat, ByteLayoutOfWrittenFile) {
  writeSafetensors(pathOf("tiny.safetensors"), {makeU8Tensor("a", {2}, {7, 9})});
  const std::string bytes = slurp(pathOf("tiny.safetensors"));
  ASSERT_GE(bytes.size(), 8u);
  std::uint64_t header_length = 0;
  for (int i = 0; i < 8; ++i) header_length |= std::uint64_t(static_cast<unsigned char>(bytes[i])) << (8 * i);
  EXPECT_EQ((8 + header_length) % 8, 0u) << "data buffer must start 8-byte aligned";
  ASSERT_EQ(bytes.size(), 8 + header_length + 2);
  const std::string header = bytes.substr(8, header_length);
  const std::string json_part = header.substr(0, header.find_last_not_of(' ') + 1);
  EXPECT_EQ(header.find_first_not_of(' ', json_part.size()), std::string::npos) << "padding is spaces";
  EXPECT_LT(header.size() - json_part.size(), 8u);
  EXPECT_EQ(nlohmann::json::parse(json_part),
            nlohmann::json::parse(R"({"a": {"dtype": "U8", "shape": [2], "data_offsets": [0, 2]}})"));
  EXPECT_EQ(static_cast<unsigned char>(bytes[8 + header_length]), 7);
  EXPECT_EQ(static_cast<unsigned char>(bytes[8 + header_length + 1]), 9);
}

TEST_F(SafetensorsFormat, ReadsHandWrittenFile) {
  // Two F64 values 1.5 and -2.0 in little-endian, after an unpadded header (legal for readers).
  const std::string data("\x00\x00\x00\x00\x00\x00\xf8\x3f"
                         "\x00\x00\x00\x00\x00\x00\x00\xc0",
                         16);
  const std::string path = rawFile(
      "hand.safetensors",
      R"({"__metadata__": {"k": "v"}, "w": {"dtype": "F64", "shape": [1, 2], "data_offsets": [0, 16]}})",
      data);
  const SafetensorsFile file = readSafetensorsFile(path);
  ASSERT_EQ(file.tensors.size(), 1u);
  EXPECT_EQ(file.tensors[0].name, "w");
  EXPECT_EQ(file.tensors[0].shape, (std::vector<std::int64_t>{1, 2}));
  EXPECT_EQ(tensorAsF64(file.tensors[0], path), (std::vector<double>{1.5, -2.0}));
  EXPECT_EQ(file.metadata.at("k"), "v");
}

TEST_F(SafetensorsFormat, TensorAsF64RejectsOtherDtypes) {
  const NamedTensor mask = makeU8Tensor("mask", {2}, {1, 0});
  try {
    tensorAsF64(mask, "file.safetensors");
    FAIL() << "no exception";
  } catch (const InputError& e) {
    EXPECT_EQ(e.file(), "file.safetensors");
    EXPECT_EQ(e.jsonPath(), "/mask");
    EXPECT_NE(std::string(e.what()).find("F64 or F32"), std::string::npos);
  }
}

TEST_F(SafetensorsFormat, WriterRejectsMalformedTensors) {
  const std::string path = pathOf("w.safetensors");
  NamedTensor short_bytes = makeF64Tensor("x", {2}, {1.0, 2.0});
  short_bytes.bytes.pop_back();
  EXPECT_THROW(writeSafetensors(path, {short_bytes}), std::invalid_argument);
  EXPECT_THROW(writeSafetensors(path, {NamedTensor{"x", "Q7", {1}, {0}}}), std::invalid_argument);
  EXPECT_THROW(writeSafetensors(path, {makeU8Tensor("x", {1}, {1}), makeU8Tensor("x", {1}, {1})}),
               std::invalid_argument);
  EXPECT_THROW(makeF64Tensor("x", {2, 2}, {1.0}), std::invalid_argument);
  EXPECT_FALSE(fs::exists(path));
  EXPECT_THROW(writeSafetensors((dir_ / "missing" / "w.safetensors").string(), {}), RuntimeFailure);
}

// ================================================================ malformed files

TEST_F(SafetensorsMalformed, FileShorterThanLengthField) {
  spit(pathOf("short"), "abc");
  expectInputError(pathOf("short"), {"at least 8 bytes", "has 3"});
}

TEST_F(SafetensorsMalformed, MissingFile) {
  expectInputError(pathOf("does-not-exist.safetensors"), {"readable safetensors file"});
}

TEST_F(SafetensorsMalformed, HeaderLengthBeyondFile) {
  const std::string path = rawFile("h", R"({"a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}})", "x", 4096);
  expectInputError(path, {"header length within the file", "4096"});
}

TEST_F(SafetensorsMalformed, TruncatedData) {
  // A valid file cut short: the offsets now point past the end of the buffer.
  writeSafetensors(pathOf("full"), {makeF64Tensor("w", {4}, {1, 2, 3, 4})});
  const std::string bytes = slurp(pathOf("full"));
  spit(pathOf("cut"), bytes.substr(0, bytes.size() - 5));
  EXPECT_EQ(expectInputError(pathOf("cut"), {"data_offsets", "buffer size"}), "/w/data_offsets");
}

TEST_F(SafetensorsMalformed, BadJson) {
  expectInputError(rawFile("j", R"({"a": {"dtype": "U8", )", ""), {"a JSON header"});
  expectInputError(rawFile("arr", R"([1, 2])", ""), {"a JSON object as header"});
}

TEST_F(SafetensorsMalformed, UnknownDtype) {
  const std::string path = rawFile("d", R"({"t": {"dtype": "Q7", "shape": [1], "data_offsets": [0, 1]}})", "x");
  EXPECT_EQ(expectInputError(path, {"known dtype", "\"Q7\""}), "/t/dtype");
}

TEST_F(SafetensorsMalformed, OffsetsOutOfBounds) {
  const std::string path =
      rawFile("o", R"({"t": {"dtype": "U8", "shape": [4], "data_offsets": [2, 6]}})", "abcd");
  EXPECT_EQ(expectInputError(path, {"<= 4", "got [2, 6]"}), "/t/data_offsets");
  const std::string reversed =
      rawFile("r", R"({"t": {"dtype": "U8", "shape": [0], "data_offsets": [3, 1]}})", "abcd");
  EXPECT_EQ(expectInputError(reversed, {"begin <= end"}), "/t/data_offsets");
  const std::string negative =
      rawFile("n", R"({"t": {"dtype": "U8", "shape": [1], "data_offsets": [-1, 0]}})", "abcd");
  EXPECT_EQ(expectInputError(negative, {"non-negative"}), "/t/data_offsets");
}

TEST_F(SafetensorsMalformed, OverlappingOffsets) {
  const std::string path = rawFile(
      "ov",
      R"({"a": {"dtype": "U8", "shape": [3], "data_offsets": [0, 3]},
          "b": {"dtype": "U8", "shape": [3], "data_offsets": [2, 5]}})",
      "abcdef");
  EXPECT_EQ(expectInputError(path, {"overlaps tensor \"a\""}), "/b/data_offsets");
}

TEST_F(SafetensorsMalformed, ShapeSizeMismatch) {
  const std::string path =
      rawFile("s", R"({"t": {"dtype": "F64", "shape": [2, 2], "data_offsets": [0, 24]}})", std::string(24, '\0'));
  EXPECT_EQ(expectInputError(path, {"32 bytes", "[2, 2]", "got 24"}), "/t/data_offsets");
  const std::string negative =
      rawFile("neg", R"({"t": {"dtype": "U8", "shape": [-1], "data_offsets": [0, 0]}})", "");
  EXPECT_EQ(expectInputError(negative, {"non-negative integer"}), "/t/shape/0");
}

TEST_F(SafetensorsMalformed, DuplicateNamesAndBadMetadata) {
  const std::string dup = rawFile(
      "dup",
      R"({"a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]},
          "a": {"dtype": "U8", "shape": [1], "data_offsets": [1, 2]}})",
      "ab");
  EXPECT_EQ(expectInputError(dup, {"occurs once"}), "/a");
  const std::string meta = rawFile("meta", R"({"__metadata__": {"n": 3}})", "");
  EXPECT_EQ(expectInputError(meta, {"a string"}), "/__metadata__/n");
  const std::string entry = rawFile("entry", R"({"t": [1, 2]})", "");
  EXPECT_EQ(expectInputError(entry, {"dtype, shape and data_offsets"}), "/t");
}

TEST_F(SafetensorsMalformed, EmptyFileAndDirectory) {
  spit(pathOf("empty"), "");
  expectInputError(pathOf("empty"), {"at least 8 bytes", "has 0"});
  fs::create_directories(dir_ / "dir.safetensors");
  expectInputError(pathOf("dir.safetensors"), {"got a directory"});
}

TEST_F(SafetensorsMalformed, UnreadableFile) {
  writeSafetensors(pathOf("locked"), {makeU8Tensor("a", {1}, {1})});
  fs::permissions(pathOf("locked"), fs::perms::none);
  if (::access(pathOf("locked").c_str(), R_OK) == 0) {
    fs::permissions(pathOf("locked"), fs::perms::owner_all);
    GTEST_SKIP() << "running with permission to read a mode-000 file (root): cannot test it";
  }
  expectInputError(pathOf("locked"), {"readable safetensors file", "Permission denied"});
  fs::permissions(pathOf("locked"), fs::perms::owner_all);
}

TEST_F(SafetensorsMalformed, DeclaredShapesBeyondTheFileAreRefusedBeforeAllocating) {
  // 2^40 * 2^40 elements: the element count itself overflows.
  const std::string count = rawFile(
      "count", R"({"t": {"dtype": "F32", "shape": [1099511627776, 1099511627776], "data_offsets": [0, 4]}})",
      "abcd");
  EXPECT_EQ(expectInputError(count, {"element count fits in 64 bits", "[1099511627776, 1099511627776]"}),
            "/t/shape");
  // 2^62 elements of 8 bytes: the count fits, the byte size does not.
  const std::string bytes = rawFile(
      "bytes", R"({"t": {"dtype": "F64", "shape": [4611686018427387904], "data_offsets": [0, 8]}})",
      std::string(8, '\0'));
  EXPECT_EQ(expectInputError(bytes, {"byte size fits in 64 bits"}), "/t/shape");
  // 4 TiB declared with matching offsets, in a file of 8 data bytes.
  const std::string offsets = rawFile(
      "offsets", R"({"t": {"dtype": "F32", "shape": [1048576, 1048576], "data_offsets": [0, 4398046511104]}})",
      std::string(8, '\0'));
  EXPECT_EQ(expectInputError(offsets, {"<= 8 (the data buffer size)", "got [0, 4398046511104]"}),
            "/t/data_offsets");
}

TEST_F(SafetensorsMalformed, DuplicateMetadataKeyIsNamed) {
  const std::string path = rawFile("meta", R"({"__metadata__": {"k": "a", "k": "b"}})", "");
  EXPECT_EQ(expectInputError(path, {"occurs once", "\"k\" appears twice"}), "/__metadata__/k");
}

// ================================================================ zero-copy view

TEST_F(SafetensorsMapped, PointsIntoTheMappedFileWithoutCopying) {
  writeSafetensors(pathOf("v.safetensors"),
                   {makeU8Tensor("mask", {3}, {1, 0, 1}), makeF64Tensor("w", {2}, {1.5, -2.0})},
                   {{"k", "v"}});
  const std::string bytes = slurp(pathOf("v.safetensors"));
  std::shared_ptr<const void> mapping;
  const std::uint8_t* w_data = nullptr;
  {
    const SafetensorsView view = SafetensorsView::open(pathOf("v.safetensors"));
    EXPECT_EQ(view.fileSize(), bytes.size());
    EXPECT_EQ(view.metadata().at("k"), "v");
    ASSERT_EQ(view.tensors().size(), 2u);
    EXPECT_EQ(view.tensors()[0].name, "mask");
    const TensorView* w = view.find("w");
    ASSERT_NE(w, nullptr);
    EXPECT_EQ(view.find("nothing"), nullptr);
    EXPECT_EQ(w->shape, (std::vector<std::int64_t>{2}));
    EXPECT_EQ(w->elements, 2);
    EXPECT_EQ(w->byte_size, 16u);
    EXPECT_EQ(w->offset, 3u);  // after the 3 mask bytes
    // The pointer is into the mapping: the file's last 16 bytes, at the mapping's base + file offset.
    const auto* base = static_cast<const std::uint8_t*>(view.mapping().get());
    EXPECT_EQ(w->data, base + bytes.size() - 16);
    EXPECT_EQ(std::memcmp(w->data, bytes.data() + bytes.size() - 16, 16), 0);
    mapping = view.mapping();
    w_data = w->data;
  }
  // A copy of mapping() keeps the bytes valid after the view is gone.
  double first = 0;
  std::memcpy(&first, w_data, 8);
  EXPECT_EQ(first, 1.5);
}

// ================================================================ problem data

Scenario smallScenario() {
  Scenario sc = test::problemScenario(11, /*B=*/2, /*S=*/3, /*H=*/4, /*E=*/3, /*F=*/5, /*L=*/2, {3, 2});
  sc.name = "io";
  sc.model.top_k = 1;
  return sc;
}

void expectSameProblem(const ProblemData& a, const ProblemData& b) {
  EXPECT_EQ(a.batch, b.batch);
  EXPECT_EQ(a.seq_len, b.seq_len);
  EXPECT_EQ(a.hidden, b.hidden);
  EXPECT_EQ(a.experts, b.experts);
  EXPECT_EQ(a.ffn, b.ffn);
  EXPECT_EQ(a.layers, b.layers);
  EXPECT_EQ(a.x, b.x);
  EXPECT_EQ(a.y, b.y);
  EXPECT_EQ(a.valid, b.valid);
  EXPECT_EQ(a.router_weight, b.router_weight);
  EXPECT_EQ(a.expert_in, b.expert_in);
  EXPECT_EQ(a.expert_out, b.expert_out);
}

TEST_F(SafetensorsProblem, WithoutFileGenerates) {
  const Scenario sc = smallScenario();
  expectSameProblem(loadProblem(sc), generateProblem(sc));
}

TEST_F(SafetensorsProblem, DumpLoadsBackIdentically) {
  const Scenario generated_from = smallScenario();
  const ProblemData original = generateProblem(generated_from);
  std::vector<std::vector<double>> reference(2, std::vector<double>(12)), mesh(2, std::vector<double>(12));
  for (int l = 0; l < 2; ++l) {
    for (int i = 0; i < 12; ++i) {
      reference[l][i] = 0.1 * i + l;
      mesh[l][i] = -0.2 * i - l;
    }
  }
  dumpProblemAndGradients(pathOf("dump.safetensors"), original, reference, mesh, {{"scenario", "io"}});

  // The scenario names the file relative to its own directory.
  Scenario from_file = smallScenario();
  from_file.seed = 999;  // the file, not the seed, decides the data
  from_file.source_file = pathOf("scenario.json");
  from_file.data.safetensors = "dump.safetensors";
  EXPECT_EQ(resolveDataPath(from_file), pathOf("dump.safetensors"));
  expectSameProblem(loadProblem(from_file), original);

  const SafetensorsFile file = readSafetensorsFile(pathOf("dump.safetensors"));
  EXPECT_EQ(file.metadata.at("scenario"), "io");
  EXPECT_EQ(file.metadata.at("format"), "moe-lbcheck problem");
  bool saw_reference = false, saw_mesh = false;
  for (const NamedTensor& t : file.tensors) {
    if (t.name == "valid") EXPECT_EQ(t.dtype, "U8");
    else EXPECT_EQ(t.dtype, "F64") << t.name;
    if (t.name == "grad.reference.layer1.router_weight") {
      saw_reference = true;
      EXPECT_EQ(t.shape, (std::vector<std::int64_t>{4, 3}));
      EXPECT_EQ(tensorAsF64(t, "dump"), reference[1]);
    }
    if (t.name == "grad.mesh.layer0.router_weight") {
      saw_mesh = true;
      EXPECT_EQ(tensorAsF64(t, "dump"), mesh[0]);
    }
  }
  EXPECT_TRUE(saw_reference);
  EXPECT_TRUE(saw_mesh);

  // Absolute data paths are used as they are.
  from_file.source_file = "/elsewhere/scenario.json";
  from_file.data.safetensors = pathOf("dump.safetensors");
  expectSameProblem(loadProblem(from_file), original);
}

TEST_F(SafetensorsProblem, DumpRejectsWrongGradientSizes) {
  const ProblemData p = generateProblem(smallScenario());
  EXPECT_THROW(dumpProblemAndGradients(pathOf("d"), p, {std::vector<double>(12)}, {}), std::invalid_argument);
  EXPECT_THROW(dumpProblemAndGradients(pathOf("d"), p, {}, {std::vector<double>(12), std::vector<double>(11)}),
               std::invalid_argument);
  EXPECT_NO_THROW(dumpProblemAndGradients(pathOf("d"), p, {}, {}));
}

TEST_F(SafetensorsProblem, ShapeMismatchNamesTensorAndShapes) {
  dumpProblemAndGradients(pathOf("data.safetensors"), generateProblem(smallScenario()), {}, {});
  Scenario sc = smallScenario();
  sc.source_file = pathOf("scenario.json");
  sc.data.safetensors = "data.safetensors";
  sc.model.experts = 5;  // the file has 3
  try {
    loadProblem(sc);
    FAIL() << "no exception";
  } catch (const InputError& e) {
    EXPECT_EQ(e.file(), sc.source_file);
    EXPECT_EQ(e.jsonPath(), "/data/safetensors");
    const std::string message = e.what();
    EXPECT_NE(message.find("tensor layer0.router_weight has shape [4, 3], expected [4, 5]"), std::string::npos)
        << message;
    EXPECT_NE(message.find(pathOf("data.safetensors")), std::string::npos) << message;
  }

  sc.model.experts = 3;
  sc.data.seq_len = 4;
  try {
    loadProblem(sc);
    FAIL() << "no exception";
  } catch (const InputError& e) {
    EXPECT_NE(std::string(e.what()).find("tensor x has shape [2, 3, 4], expected [2, 4, 4]"), std::string::npos)
        << e.what();
  }
}

TEST_F(SafetensorsProblem, MissingTensorExtraLayerAndBadMask) {
  const ProblemData p = generateProblem(smallScenario());
  Scenario sc = smallScenario();
  sc.source_file = pathOf("scenario.json");
  sc.data.safetensors = "data.safetensors";

  // Missing: a file without layer1.expert_out.
  std::vector<NamedTensor> tensors = {
      makeF64Tensor("x", {2, 3, 4}, p.x), makeF64Tensor("y", {2, 3, 4}, p.y), makeU8Tensor("valid", {2, 3}, p.valid)};
  for (int l = 0; l < 2; ++l) {
    tensors.push_back(makeF64Tensor("layer" + std::to_string(l) + ".router_weight", {4, 3}, p.router_weight[l]));
    tensors.push_back(makeF64Tensor("layer" + std::to_string(l) + ".expert_in", {3, 4, 5}, p.expert_in[l]));
    if (l == 0) tensors.push_back(makeF64Tensor("layer0.expert_out", {3, 5, 4}, p.expert_out[l]));
  }
  writeSafetensors(pathOf("data.safetensors"), tensors);
  try {
    loadProblem(sc);
    FAIL() << "no exception";
  } catch (const InputError& e) {
    EXPECT_EQ(e.jsonPath(), "/data/safetensors");
    EXPECT_NE(std::string(e.what()).find("layer1.expert_out of shape [3, 5, 4]"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("missing"), std::string::npos) << e.what();
  }

  // More layers in the file than in the scenario.
  dumpProblemAndGradients(pathOf("data.safetensors"), p, {}, {});
  sc.model.layers = 1;
  try {
    loadProblem(sc);
    FAIL() << "no exception";
  } catch (const InputError& e) {
    EXPECT_NE(std::string(e.what()).find("layer1.router_weight"), std::string::npos) << e.what();
  }
  sc.model.layers = 2;

  // A mask value that is neither 0 nor 1, and a mask of the wrong dtype.
  tensors = readSafetensors(pathOf("data.safetensors"));
  for (NamedTensor& t : tensors) {
    if (t.name == "valid") t.bytes[1] = 2;
  }
  writeSafetensors(pathOf("data.safetensors"), tensors);
  try {
    loadProblem(sc);
    FAIL() << "no exception";
  } catch (const InputError& e) {
    EXPECT_EQ(e.file(), pathOf("data.safetensors"));
    EXPECT_EQ(e.jsonPath(), "/valid");
    EXPECT_NE(std::string(e.what()).find("values 0 or 1, element 1 is 2"), std::string::npos) << e.what();
  }
  for (NamedTensor& t : tensors) {
    if (t.name == "valid") t = makeF64Tensor("valid", {2, 3}, std::vector<double>(6, 1.0));
  }
  writeSafetensors(pathOf("data.safetensors"), tensors);
  EXPECT_THROW(loadProblem(sc), InputError);

  // BOOL masks and F32 data are accepted.
  tensors = readSafetensors(pathOf("data.safetensors"));
  for (NamedTensor& t : tensors) {
    if (t.name == "valid") t = NamedTensor{"valid", "BOOL", {2, 3}, {1, 1, 1, 1, 1, 0}};
    if (t.name == "x") {
      std::vector<std::uint8_t> bytes;
      for (int i = 0; i < 24; ++i) {
        const float value = 0.5f * i;
        std::uint32_t bits;
        std::memcpy(&bits, &value, 4);
        for (int b = 0; b < 4; ++b) bytes.push_back(static_cast<std::uint8_t>(bits >> (8 * b)));
      }
      t = NamedTensor{"x", "F32", {2, 3, 4}, bytes};
    }
  }
  writeSafetensors(pathOf("data.safetensors"), tensors);
  const ProblemData loaded = loadProblem(sc);
  EXPECT_EQ(loaded.valid, (std::vector<std::uint8_t>{1, 1, 1, 1, 1, 0}));
  EXPECT_DOUBLE_EQ(loaded.x[23], 11.5);
}

TEST_F(SafetensorsProblem, NonFiniteDataRejected) {
  ProblemData p = generateProblem(smallScenario());
  p.y[5] = std::numeric_limits<double>::quiet_NaN();
  dumpProblemAndGradients(pathOf("data.safetensors"), p, {}, {});
  Scenario sc = smallScenario();
  sc.data.safetensors = pathOf("data.safetensors");
  try {
    loadProblem(sc);
    FAIL() << "no exception";
  } catch (const InputError& e) {
    EXPECT_EQ(e.jsonPath(), "/y");
    EXPECT_NE(std::string(e.what()).find("finite values, element 5"), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace moe
