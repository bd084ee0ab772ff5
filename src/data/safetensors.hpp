// A torch-free reader and writer of the safetensors format
// (https://huggingface.co/docs/safetensors): an 8-byte little-endian u64 header length N, N bytes of
// JSON header {"NAME": {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}},
// then the data buffer (offsets relative to its start; little-endian; row-major, contiguous).
#pragma once

#include <cstdint>
#include <map>
#include <memory>
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

// Reads and validates the whole file (the rules of SafetensorsView::open) and copies every tensor's
// bytes. Any violation throws moe::InputError(path, "/<tensor name>" (JSON pointer) or "", what was
// expected).
SafetensorsFile readSafetensorsFile(const std::string& path);
std::vector<NamedTensor> readSafetensors(const std::string& path);

// One tensor of a memory-mapped file: its entry in the header and where its bytes lie. `data` points
// into the mapping and stays valid while the SafetensorsView, or a copy of its mapping(), lives.
struct TensorView {
  std::string name;
  std::string dtype;
  std::vector<std::int64_t> shape;
  std::int64_t elements = 0;        // prod(shape)
  const std::uint8_t* data = nullptr;  // byte_size bytes (little-endian, row-major, any alignment)
  std::uint64_t byte_size = 0;      // elements * itemsize(dtype)
  std::uint64_t offset = 0;         // data_offsets[0], relative to the start of the data buffer
};

// A safetensors file mapped read-only (mmap) and validated without reading any tensor's data:
// a regular file of at least 8 bytes, a header length within the file (and at most 100 MB), the
// header one JSON object with no key twice, every entry an object with a known dtype, a shape of
// non-negative integers whose byte size fits in 64 bits, data_offsets [begin, end] with
// begin <= end <= data buffer size and end - begin = prod(shape) * itemsize, no two non-empty tensors
// sharing a byte, "__metadata__" an object of strings. Nothing is allocated in proportion to a
// declared shape: every size is checked against the file's size first. Any violation throws
// moe::InputError(path, "/<tensor name>[/<field>]" or "", what was expected, what was found).
//
// A file truncated by another process *after* open() makes reads of the lost pages fault (SIGBUS):
// the mapping cannot guard against that, as no reader of a file that changes under it can.
class SafetensorsView {
 public:
  // prefault: map every page at once (MAP_POPULATE) for a caller that will read all of the data; it
  // saves a page fault per few pages (a quarter of the load time of a capture already in the page
  // cache) and costs nothing when the file is read whole anyway.
  static SafetensorsView open(const std::string& path, bool prefault = false);

  const std::string& path() const { return path_; }
  std::uint64_t fileSize() const { return file_size_; }
  const std::vector<TensorView>& tensors() const { return tensors_; }  // in file (data) order
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  // The tensor named `name`, or nullptr.
  const TensorView* find(const std::string& name) const;
  // Owns the mapping (unmapped when the last copy goes); `data` of every TensorView points into it.
  const std::shared_ptr<const void>& mapping() const { return mapping_; }

 private:
  std::string path_;
  std::uint64_t file_size_ = 0;
  std::shared_ptr<const void> mapping_;
  std::vector<TensorView> tensors_;
  std::map<std::string, std::size_t> index_;  // name -> position in tensors_
  std::map<std::string, std::string> metadata_;
};

// Drops the pages of [address, address + bytes) of a read-only file mapping from the process's resident
// set (madvise MADV_DONTNEED, the range widened to whole pages). Nothing is lost: the mapping is never
// written, so a later read faults the bytes back in from the file (usually from the page cache). A
// reader that streams a large mapping once calls it on what it has read, so that its peak RSS does not
// grow with the file size. Errors are ignored (the call only gives advice).
void releaseResidentPages(const void* address, std::size_t bytes) noexcept;

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
