// Bad input, every kind, as one table: the rows the end-to-end tests run through the torch-free
// driver moe-lbcheck-inputs (tests/base/test_bad_inputs.cpp, also under scripts/sanitize.sh) and
// through the real moe-lbcheck (tests/torch/test_bad_inputs_cli.cpp: validate, run, verify).
//
// Each row builds one broken input in a fresh directory: a scenario file, a scenario whose
// data.safetensors file is broken, or a capture directory with one broken rank file. Every row must
// exit 2, name the file and the JSON path or tensor (`expected` substrings of the message), write
// nothing (--report is not created) and not crash.
#pragma once

#include <unistd.h>

#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <limits>
#include <ostream>
#include <set>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#include "capture_job.hpp"
#include "data/problem.hpp"
#include "data/problem_io.hpp"
#include "data/safetensors.hpp"
#include "file_utils.hpp"
#include "scenario/scenario.hpp"

namespace moe::badinput {

namespace fs = std::filesystem;

// What the program under test is given.
enum class InputKind {
  kScenario,  // a scenario file (driver: `scenario`; CLI: `validate` and `run`)
  kData,      // a valid scenario naming a broken data.safetensors (driver: `scenario`; CLI: `run`)
  kCapture,   // a capture directory (driver: `capture`; CLI: `verify`)
};

struct BuiltInput {
  std::string path;                   // the scenario file or the capture directory
  std::vector<std::string> expected;  // substrings of the error message: file, JSON path or tensor
  std::string skip_reason;            // non-empty: the row cannot be tested here (e.g. root reads mode 000)
};

struct BadInputCase {
  const char* name;  // a gtest-safe name: [A-Za-z0-9_]
  InputKind kind;
  std::function<BuiltInput(const fs::path& dir)> build;
};
// gtest prints a row by its name (not as bytes).
inline void PrintTo(const BadInputCase& row, std::ostream* os) { *os << row.name; }

// ------------------------------------------------------------------------------------ helpers

using test::readText;
using test::writeText;

// `text` with the first `from` replaced by `to` (the row's own edit; throws if `from` is absent so a
// row cannot silently test the valid input).
inline std::string replaceOnce(std::string text, const std::string& from, const std::string& to) {
  const auto at = text.find(from);
  if (at == std::string::npos) throw std::logic_error("bad-input table: \"" + from + "\" not in the input");
  return text.replace(at, from.size(), to);
}

// A small valid scenario (one device, two layers), as text.
inline std::string validScenarioText(const std::string& data_entry = "") {
  return R"({
  "schema_version": 1,
  "name": "bad-input-base",
  "description": "the valid scenario every bad-input row edits",
  "seed": 7,
  "model": {"hidden": 4, "experts": 4, "top_k": 2, "layers": 2, "ffn": 3, "score": "softmax"},
  "data": {"batch": 2, "seq_len": 4)" + data_entry + R"(},
  "aux": {"type": "micro_batch", "coeff": 0.01, "z_loss_coeff": 0.001},
  "mesh": {"dp": 1, "pp": 1, "cp": 1, "microbatches": 1},
  "framework": {"preset": "megatron"},
  "expect": {"verdict": "pass"}
}
)";
}

// The row is unreadable for this user? (root reads a mode-000 file: skip, saying why.)
inline std::string skipIfReadable(const fs::path& path) {
  if (::access(path.c_str(), R_OK) == 0)
    return "running with permission to read a mode-000 file (root): cannot test it";
  return "";
}

// A scenario file `scenario.json` in `dir` with `text`; the message must name it.
inline BuiltInput scenarioRow(const fs::path& dir, const std::string& text, std::vector<std::string> expected) {
  const fs::path path = dir / "scenario.json";
  writeText(path, text);
  expected.insert(expected.begin(), path.string());
  return {path.string(), expected, ""};
}

// A valid data file data.safetensors for validScenarioText's sizes (x, y, valid, the weights) and the
// scenario naming it; returns the scenario's path.
inline fs::path writeScenarioWithData(const fs::path& dir) {
  const std::string text = validScenarioText(R"(, "safetensors": "data.safetensors")");
  writeText(dir / "scenario.json", text);
  Scenario scenario = parseScenarioText(validScenarioText(), (dir / "scenario.json").string());
  dumpProblemAndGradients((dir / "data.safetensors").string(), generateProblem(scenario), {}, {});
  return dir / "scenario.json";
}

// The header text and the data buffer of a safetensors file.
struct SafetensorsParts {
  std::string header;
  std::string data;
};
inline SafetensorsParts splitSafetensors(const std::string& bytes) {
  std::uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | static_cast<unsigned char>(bytes.at(static_cast<std::size_t>(i)));
  return {bytes.substr(8, n), bytes.substr(8 + n)};
}
inline std::string joinSafetensors(const std::string& header, const std::string& data) {
  std::string out(8, '\0');
  const std::uint64_t n = header.size();
  for (int i = 0; i < 8; ++i) out[static_cast<std::size_t>(i)] = static_cast<char>((n >> (8 * i)) & 0xff);
  return out + header + data;
}

// The input `input` after `edit` was applied to the bytes of its file `edited`; the message must name
// that file first.
inline BuiltInput withEditedFile(const fs::path& input, const fs::path& edited,
                                 const std::function<std::string(std::string)>& edit,
                                 std::vector<std::string> expected) {
  writeText(edited, edit(readText(edited)));
  expected.insert(expected.begin(), edited.string());
  return {input.string(), expected, ""};
}

// A data row: the valid scenario + data file, then `edit` applied to the data file's bytes.
inline BuiltInput dataRow(const fs::path& dir, const std::function<std::string(std::string)>& edit,
                          std::vector<std::string> expected) {
  return withEditedFile(writeScenarioWithData(dir), dir / "data.safetensors", edit, std::move(expected));
}
// An edit of the data file's header text only (the length prefix is rewritten to match).
inline std::function<std::string(std::string)> editHeader(std::function<std::string(std::string)> edit) {
  return [edit](std::string bytes) {
    const SafetensorsParts parts = splitSafetensors(bytes);
    return joinSafetensors(edit(parts.header), parts.data);
  };
}
// The valid data file's tensors with `change` applied, written back as a well-formed file.
inline std::function<std::string(std::string)> editTensors(std::function<void(std::vector<NamedTensor>&)> change,
                                                           const fs::path& scratch) {
  return [change, scratch](std::string bytes) {
    const fs::path tmp = scratch / "tensors.tmp";
    writeText(tmp, bytes);
    std::vector<NamedTensor> tensors = readSafetensors(tmp.string());
    change(tensors);
    writeSafetensors(tmp.string(), tensors);
    std::string out = readText(tmp);
    fs::remove(tmp);
    return out;
  };
}
inline NamedTensor& tensorNamed(std::vector<NamedTensor>& tensors, const std::string& name) {
  for (NamedTensor& t : tensors)
    if (t.name == name) return t;
  throw std::logic_error("bad-input table: no tensor " + name);
}

// A capture row: the valid 4-rank test job in dir/capture, then `edit` applied to rank 1's file
// bytes. The message must name rank1.safetensors.
inline BuiltInput captureRow(const fs::path& dir, const std::function<std::string(std::string)>& edit,
                             std::vector<std::string> expected) {
  const fs::path capture = dir / "capture";
  writeCapture(capture.string(), testjob::buildJob(testjob::JobShape{}));
  return withEditedFile(capture, capture / "rank1.safetensors", edit, std::move(expected));
}
// An edit of rank 1's manifest text (spliced back as __metadata__["moe_lbcheck_capture"]).
inline std::function<std::string(std::string)> editManifest(std::function<std::string(std::string)> edit) {
  return [edit](std::string bytes) {
    const std::vector<std::uint8_t> raw(bytes.begin(), bytes.end());
    const testjob::RankFileParts parts = testjob::splitRankFile(raw);
    const std::vector<std::uint8_t> out = testjob::rankFileWithManifest(parts, edit(parts.manifest));
    return std::string(out.begin(), out.end());
  };
}

inline std::string deepArray(int depth) { return std::string(depth, '[') + std::string(depth, ']'); }

// ------------------------------------------------------------------------------------ the table

inline std::vector<BadInputCase> badInputCases() {
  using K = InputKind;
  const std::string base = validScenarioText();
  std::vector<BadInputCase> rows;
  auto scenario = [&](const char* name, std::string text, std::vector<std::string> expected) {
    rows.push_back({name, K::kScenario, [text, expected](const fs::path& dir) {
                      return scenarioRow(dir, text, expected);
                    }});
  };
  // --- scenario files
  scenario("ScenarioWrongType", replaceOnce(base, R"("hidden": 4)", R"("hidden": "4")"),
           {"/model/hidden", "an integer"});
  scenario("ScenarioNumberBeyondDouble", replaceOnce(base, R"("coeff": 0.01)", R"("coeff": 1e400)"),
           {"/aux/coeff", "within the range of a double"});
  scenario("ScenarioNaN", replaceOnce(base, R"("coeff": 0.01)", R"("coeff": NaN)"), {"invalid JSON", "line 8", "near /aux/coeff"});
  scenario("ScenarioInfinity", replaceOnce(base, R"("z_loss_coeff": 0.001)", R"("z_loss_coeff": -Infinity)"),
           {"invalid JSON", "line 8", "/aux/z_loss_coeff"});
  scenario("ScenarioNegativeZeroCount", replaceOnce(base, R"("top_k": 2)", R"("top_k": -0)"),
           {"/model/top_k", ">= 1"});
  // (-0.0 where a real number >= 0 is expected, e.g. aux.coeff, is zero and accepted.)
  scenario("ScenarioNegativeZeroFloatForACount", replaceOnce(base, R"("dp": 1)", R"("dp": -0.0)"),
           {"/mesh/dp", "an integer >= 1", "-0.0"});
  scenario("ScenarioHugeInteger", replaceOnce(base, R"("seed": 7)", R"("seed": 18446744073709551616)"),
           {"/seed", "2^64"});
  scenario("ScenarioIntegerBeyondInt", replaceOnce(base, R"("hidden": 4)", R"("hidden": 4294967297)"),
           {"/model/hidden", "2147483647"});
  scenario("ScenarioDuplicateKey", replaceOnce(base, R"("seed": 7)", R"("seed": 7, "seed": 8)"),
           {"/seed", "twice"});
  scenario("ScenarioDuplicateNestedKey", replaceOnce(base, R"("dp": 1)", R"("dp": 1, "dp": 2)"),
           {"/mesh/dp", "twice"});
  scenario("ScenarioDeepNesting",
           replaceOnce(base, R"("description": "the valid scenario every bad-input row edits")",
                       R"("description": )" + deepArray(10000)),
           {"/description", "nest"});
  scenario("ScenarioNonUtf8",
           replaceOnce(base, "the valid scenario every bad-input row edits", "caf\xe9 \xff\xfe"),
           {"invalid JSON", "line 4", "/description", "UTF-8"});
  scenario("ScenarioEmptyFile", "", {"invalid JSON", "line 1"});
  scenario("ScenarioTruncated", base.substr(0, base.size() / 2), {"invalid JSON", "line 7", "near /model"});
  scenario("ScenarioTopLevelArray", "[" + base + "]", {"a JSON object at the top level"});
  scenario("ScenarioMemoryBeyondTheBound",
           replaceOnce(replaceOnce(base, R"("hidden": 4, "experts": 4)", R"("hidden": 7168, "experts": 256)"),
                       R"("batch": 2, "seq_len": 4)", R"("batch": 64, "seq_len": 4096)"),
           {"memory", "GiB", "/data/batch"});
  rows.push_back({"ScenarioIsADirectory", K::kScenario, [](const fs::path& dir) {
                    fs::create_directories(dir / "scenario.json");
                    return BuiltInput{(dir / "scenario.json").string(),
                                      {(dir / "scenario.json").string(), "a directory"}, ""};
                  }});
  rows.push_back({"ScenarioUnreadable", K::kScenario, [base](const fs::path& dir) {
                    BuiltInput in = scenarioRow(dir, base, {"Permission denied"});
                    fs::permissions(in.path, fs::perms::none);
                    in.skip_reason = skipIfReadable(in.path);
                    return in;
                  }});

  // --- data files (data.safetensors of a valid scenario)
  auto data = [&](const char* name, std::function<std::string(std::string)> edit, std::vector<std::string> expected) {
    rows.push_back({name, K::kData, [edit, expected](const fs::path& dir) { return dataRow(dir, edit, expected); }});
  };
  auto tensors = [&](const char* name, std::function<void(std::vector<NamedTensor>&)> change,
                     std::vector<std::string> expected) {
    rows.push_back({name, K::kData, [change, expected](const fs::path& dir) {
                      return dataRow(dir, editTensors(change, dir), expected);
                    }});
  };
  tensors("DataWrongDtype", [](std::vector<NamedTensor>& t) { tensorNamed(t, "x").dtype = "I64"; },
          {"/x", "F64"});
  tensors("DataWrongShape", [](std::vector<NamedTensor>& t) {
            NamedTensor& w = tensorNamed(t, "layer0.router_weight");
            w.shape = {w.shape[1], w.shape[0]};
            if (w.shape[0] == w.shape[1]) w.shape = {1, w.shape[0] * w.shape[1]};
          }, {"layer0.router_weight", "expected"});
  tensors("DataNaNValue", [](std::vector<NamedTensor>& t) {
            NamedTensor& x = tensorNamed(t, "x");
            const double nan = std::numeric_limits<double>::quiet_NaN();
            std::memcpy(x.bytes.data() + 8, &nan, 8);
          }, {"/x", "finite", "element 1"});
  tensors("DataInfiniteValue", [](std::vector<NamedTensor>& t) {
            NamedTensor& w = tensorNamed(t, "layer1.expert_out");
            const double inf = -std::numeric_limits<double>::infinity();
            std::memcpy(w.bytes.data(), &inf, 8);
          }, {"/layer1.expert_out", "finite", "element 0"});
  tensors("DataMaskNotZeroOrOne", [](std::vector<NamedTensor>& t) { tensorNamed(t, "valid").bytes[3] = 7; },
          {"/valid", "0 or 1"});
  data("DataOffsetBeyondDouble", editHeader([](std::string h) {
         return replaceOnce(h, R"("data_offsets":[0,)", R"("data_offsets":[1e400,)");
       }), {"/data_offsets/0", "within the range of a double"});
  data("DataOffsetNaN", editHeader([](std::string h) {
         return replaceOnce(h, R"("data_offsets":[0,)", R"("data_offsets":[NaN,)");
       }), {"invalid JSON", "/x/data_offsets/0"});
  data("DataNegativeZeroShape", editHeader([](std::string h) {
         return replaceOnce(h, R"("shape":[2,4])", R"("shape":[-0,4])");
       }), {"/valid"});
  data("DataHugeIntegerShape", editHeader([](std::string h) {
         return replaceOnce(h, R"("shape":[2,4])", R"("shape":[18446744073709551616,4])");
       }), {"/valid/shape"});
  data("DataDuplicateTensor", editHeader([](std::string h) {
         return replaceOnce(h, R"({"__metadata__")", R"({"x":{"dtype":"U8","shape":[0],"data_offsets":[0,0]},"__metadata__")");
       }), {"/x", "twice"});
  data("DataDeepNesting", editHeader([](std::string h) {
         return replaceOnce(h, R"({"__metadata__":{)", R"({"__metadata__":{"deep":)" + deepArray(10000) + ",");
       }), {"/__metadata__/deep"});
  data("DataNonUtf8Header", editHeader([](std::string h) {
         return replaceOnce(h, R"("__metadata__":{)", "\"__metadata__\":{\"n\xff\":\"v\",");
       }), {"UTF-8", "/__metadata__"});
  data("DataEmptyFile", [](std::string) { return std::string(); }, {"at least 8 bytes"});
  data("DataTruncated", [](std::string b) { return b.substr(0, b.size() - 9); }, {"data"});
  data("DataTruncatedHeader", [](std::string b) { return b.substr(0, 40); }, {"header"});
  data("DataShapeBeyondTheFile", editHeader([](std::string h) {
         return replaceOnce(h, R"("shape":[2,4])", R"("shape":[4294967296,4294967296])");
       }), {"/valid"});
  rows.push_back({"DataIsADirectory", K::kData, [](const fs::path& dir) {
                    const fs::path scenario = writeScenarioWithData(dir);
                    fs::remove(dir / "data.safetensors");
                    fs::create_directories(dir / "data.safetensors");
                    return BuiltInput{scenario.string(), {(dir / "data.safetensors").string(), "a directory"}, ""};
                  }});
  rows.push_back({"DataUnreadable", K::kData, [](const fs::path& dir) {
                    const fs::path scenario = writeScenarioWithData(dir);
                    fs::permissions(dir / "data.safetensors", fs::perms::none);
                    return BuiltInput{scenario.string(),
                                      {(dir / "data.safetensors").string(), "Permission denied"},
                                      skipIfReadable(dir / "data.safetensors")};
                  }});

  // --- captures (rank1.safetensors of a valid 4-rank job)
  auto manifest = [&](const char* name, std::function<std::string(std::string)> edit, std::vector<std::string> expected) {
    rows.push_back({name, K::kCapture, [edit, expected](const fs::path& dir) {
                      return captureRow(dir, editManifest(edit), expected);
                    }});
  };
  auto rankFile = [&](const char* name, std::function<std::string(std::string)> edit, std::vector<std::string> expected) {
    rows.push_back({name, K::kCapture, [edit, expected](const fs::path& dir) { return captureRow(dir, edit, expected); }});
  };
  manifest("CaptureWrongType", [](std::string m) { return replaceOnce(m, R"("world_size":4)", R"("world_size":"4")"); },
           {"/world_size"});
  manifest("CaptureNumberBeyondDouble", [](std::string m) { return replaceOnce(m, R"("coeff":0.01)", R"("coeff":1e400)"); },
           {"/objective/coeff", "1e400"});
  manifest("CaptureNaN", [](std::string m) { return replaceOnce(m, R"("coeff":0.01)", R"("coeff":NaN)"); },
           {"/objective/coeff", "NaN"});
  manifest("CaptureNegativeZeroSize", [](std::string m) { return replaceOnce(m, R"("cp_size":1)", R"("cp_size":-0)"); },
           {"/mesh/cp_size"});
  manifest("CaptureHugeInteger", [](std::string m) { return replaceOnce(m, R"("rank":1)", R"("rank":18446744073709551617)"); },
           {"/rank"});
  manifest("CaptureDuplicateKey", [](std::string m) { return replaceOnce(m, R"("rank":1)", R"("rank":1,"rank":1)"); },
           {"/rank", "twice"});
  manifest("CaptureDeepNesting", [](std::string m) {
             return replaceOnce(m, R"("rank":1)", R"("rank":1,"framework":)" + deepArray(10000));
           }, {"/framework"});
  manifest("CaptureNonUtf8", [](std::string m) { return replaceOnce(m, R"("framework":")", "\"framework\":\"\xc3\x28"); },
           {"UTF-8", "/__metadata__/moe_lbcheck_capture"});
  manifest("CaptureManifestTruncated", [](std::string m) { return m.substr(0, m.size() / 2); }, {"invalid JSON", "/objective"});
  rankFile("CaptureNaNGradient", [](std::string b) {
             // The first F32 element of layer0.weight.grad: found by its offset in the header.
             const SafetensorsParts parts = splitSafetensors(b);
             const std::string key = R"("layer0.weight.grad":{"dtype":"F32","shape":[4,3],"data_offsets":[)";
             const auto at = parts.header.find(key);
             if (at == std::string::npos) throw std::logic_error("bad-input table: no layer0.weight.grad entry");
             const std::size_t begin = std::stoul(parts.header.substr(at + key.size()));
             std::string data = parts.data;
             const std::uint32_t nan_bits = 0x7fc00000u;
             std::memcpy(&data[begin], &nan_bits, 4);
             return joinSafetensors(parts.header, data);
           }, {"layer0.weight.grad", "finite"});
  rankFile("CaptureEmptyRankFile", [](std::string) { return std::string(); }, {"at least 8 bytes"});
  rankFile("CaptureTruncatedRankFile", [](std::string b) { return b.substr(0, b.size() - 5); }, {"data"});
  rankFile("CaptureShapeBeyondTheFile", editHeader([](std::string h) {
             return replaceOnce(h, R"("layer0.weight.grad":{"dtype":"F32","shape":[4,3])",
                                R"("layer0.weight.grad":{"dtype":"F32","shape":[4294967296,4294967296])");
           }), {"/layer0.weight.grad"});
  rows.push_back({"CaptureRankFileIsADirectory", K::kCapture, [](const fs::path& dir) {
                    const fs::path capture = dir / "capture";
                    writeCapture(capture.string(), testjob::buildJob(testjob::JobShape{}));
                    fs::remove(capture / "rank1.safetensors");
                    fs::create_directories(capture / "rank1.safetensors");
                    return BuiltInput{capture.string(), {(capture / "rank1.safetensors").string(), "directory"}, ""};
                  }});
  rows.push_back({"CaptureUnreadableRankFile", K::kCapture, [](const fs::path& dir) {
                    BuiltInput in = captureRow(dir, [](std::string b) { return b; }, {"Permission denied"});
                    fs::permissions(fs::path(in.path) / "rank1.safetensors", fs::perms::none);
                    in.skip_reason = skipIfReadable(fs::path(in.path) / "rank1.safetensors");
                    return in;
                  }});
  rows.push_back({"CaptureDirectoryIsAFile", K::kCapture, [](const fs::path& dir) {
                    writeText(dir / "capture", "not a directory");
                    return BuiltInput{(dir / "capture").string(), {(dir / "capture").string(), "a file"}, ""};
                  }});
  return rows;
}

// Every path below `dir`: what a row may not add to its work folder (nothing written).
inline std::set<std::string> listTree(const fs::path& dir) {
  std::set<std::string> names;
  for (const auto& entry : fs::recursive_directory_iterator(dir)) names.insert(entry.path().string());
  return names;
}

}  // namespace moe::badinput
