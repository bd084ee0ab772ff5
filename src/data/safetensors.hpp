// A torch-free reader and writer of the safetensors format
// (https://huggingface.co/docs/safetensors): an 8-byte little-endian u64 header length N, N bytes of
// JSON header {"NAME": {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}},
// then the data buffer (offsets relative to its start; little-endian; row-major, contiguous).
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

namespace moe {

// One tensor: its raw little-endian bytes, exactly prod(shape) * itemsize(dtype) of them.
struct NamedTensor {
  std::string name;
  std::string dtype;  // safetensors dtype name: "F64", "F32", "U8", "BOOL", ...
  std::vector<std::int64_t> shape;
  std::vector<std::uint8_t> bytes;
};

struct SafetensorsFile {
  std::vector<NamedTensor> tensors;             // in the order of their data in the file
  std::map<std::string, std::string> metadata;  // the "__metadata__" entry
};

// Bytes per element of a safetensors dtype name; 0 when the name is unknown.
std::size_t safetensorsItemSize(const std::string& dtype);

// Writes the tensors in the given order, atomically (temp file + rename: never a partial file). The
// header is padded with spaces so that the data buffer starts at an 8-byte-aligned offset.
// Throws std::invalid_argument on a malformed tensor (unknown dtype, byte count not matching the
// shape, duplicate or reserved name) and moe::RuntimeFailure naming the path on I/O errors.
void writeSafetensors(const std::string& path, const std::vector<NamedTensor>& tensors,
                      const std::map<std::string, std::string>& metadata = {});

// Reads and validates the whole file: header length within the file, header a JSON object, every
// entry with a known dtype, a non-negative shape and in-bounds, non-overlapping offsets whose size is
// prod(shape) * itemsize, no duplicate names, metadata string to string. Any violation throws
// moe::InputError(path, "/<tensor name>" (JSON pointer) or "", what was expected).
SafetensorsFile readSafetensorsFile(const std::string& path);
std::vector<NamedTensor> readSafetensors(const std::string& path);

// Builders; throw std::invalid_argument when values.size() != prod(shape).
NamedTensor makeF64Tensor(std::string name, std::vector<std::int64_t> shape,
                          const std::vector<double>& values);
NamedTensor makeU8Tensor(std::string name, std::vector<std::int64_t> shape,
                         const std::vector<std::uint8_t>& values);

// The tensor's values as doubles (F64 exact, F32 widened). Any other dtype throws
// moe::InputError(file_for_errors, "/<tensor name>", ...).
std::vector<double> tensorAsF64(const NamedTensor& tensor, const std::string& file_for_errors);

// Number of elements of a shape (1 for a scalar []); throws std::invalid_argument on a negative
// dimension or an overflow.
std::int64_t elementCount(const std::vector<std::int64_t>& shape);

// "[2, 3, 4]"
std::string shapeToString(const std::vector<std::int64_t>& shape);

}  // namespace moe
