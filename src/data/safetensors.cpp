#include "data/safetensors.hpp"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <cstring>
#include <set>
#include <stdexcept>
#include <string_view>

#include <nlohmann/json.hpp>

#include "common/errors.hpp"
#include "common/json_input.hpp"
#include "report/reporters.hpp"  // writeFileAtomically

namespace moe {
namespace {

constexpr const char* kMetadataKey = "__metadata__";
// The reference implementation refuses headers above 100 MB; so do we (and never allocate more).
constexpr std::uint64_t kMaxHeaderBytes = 100'000'000;

// JSON pointer of a tensor entry.
std::string pointerTo(const std::string& name) { return "/" + json_input::jsonPointerSegment(name); }

std::string knownDtypes() {
  return "BOOL, U8, I8, F8_E4M3, F8_E5M2, U16, I16, F16, BF16, U32, I32, F32, U64, I64, F64";
}

void appendLittleEndian(std::string& out, std::uint64_t value, int bytes) {
  for (int i = 0; i < bytes; ++i) out.push_back(static_cast<char>((value >> (8 * i)) & 0xff));
}

std::uint64_t readLittleEndian(const std::uint8_t* bytes, int count) {
  std::uint64_t value = 0;
  for (int i = 0; i < count; ++i) value |= static_cast<std::uint64_t>(bytes[i]) << (8 * i);
  return value;
}

// Parses and validates one tensor entry of the header (everything except overlap, which needs all
// entries). Only sizes are computed here; nothing is read or allocated per element.
TensorView parseEntry(const std::string& path, const std::string& name, const nlohmann::json& entry,
                      std::uint64_t buffer_size, std::uint64_t& end_offset) {
  const std::string pointer = pointerTo(name);
  if (!entry.is_object()) {
    throw InputError(path, pointer, "an object with dtype, shape and data_offsets, got " +
                                        std::string(entry.type_name()));
  }
  TensorView tensor;
  tensor.name = name;

  if (!entry.contains("dtype") || !entry["dtype"].is_string()) {
    throw InputError(path, pointer + "/dtype", "a dtype string (" + knownDtypes() + ")");
  }
  tensor.dtype = entry["dtype"].get<std::string>();
  const std::size_t item_size = safetensorsItemSize(tensor.dtype);
  if (item_size == 0) {
    throw InputError(path, pointer + "/dtype",
                     "a known dtype (" + knownDtypes() + "), got \"" + tensor.dtype + "\"");
  }

  if (!entry.contains("shape") || !entry["shape"].is_array()) {
    throw InputError(path, pointer + "/shape", "an array of non-negative integers");
  }
  for (std::size_t i = 0; i < entry["shape"].size(); ++i) {
    const nlohmann::json& dim = entry["shape"][i];
    if (!dim.is_number_integer() || (!dim.is_number_unsigned() && dim.get<std::int64_t>() < 0) ||
        (dim.is_number_unsigned() && dim.get<std::uint64_t>() > static_cast<std::uint64_t>(INT64_MAX))) {
      throw InputError(path, pointer + "/shape/" + std::to_string(i),
                       "a non-negative integer, got " + dim.dump());
    }
    tensor.shape.push_back(dim.get<std::int64_t>());
  }
  try {
    tensor.elements = elementCount(tensor.shape);
  } catch (const std::invalid_argument&) {
    throw InputError(path, pointer + "/shape", "a shape whose element count fits in 64 bits, got " +
                                                   shapeToString(tensor.shape));
  }

  const nlohmann::json* offsets = entry.contains("data_offsets") ? &entry["data_offsets"] : nullptr;
  if (offsets == nullptr || !offsets->is_array() || offsets->size() != 2 ||
      !(*offsets)[0].is_number_unsigned() || !(*offsets)[1].is_number_unsigned()) {
    throw InputError(path, pointer + "/data_offsets",
                     "[begin, end] with non-negative integers, got " +
                         (offsets ? offsets->dump() : std::string("nothing")));
  }
  tensor.offset = (*offsets)[0].get<std::uint64_t>();
  end_offset = (*offsets)[1].get<std::uint64_t>();
  if (tensor.offset > end_offset || end_offset > buffer_size) {
    throw InputError(path, pointer + "/data_offsets",
                     "0 <= begin <= end <= " + std::to_string(buffer_size) +
                         " (the data buffer size), got [" + std::to_string(tensor.offset) + ", " +
                         std::to_string(end_offset) + "]");
  }
  std::uint64_t expected_bytes = 0;
  if (__builtin_mul_overflow(static_cast<std::uint64_t>(tensor.elements), item_size, &expected_bytes)) {
    throw InputError(path, pointer + "/shape", "a shape whose byte size fits in 64 bits, got " +
                                                   shapeToString(tensor.shape) + " of " + tensor.dtype);
  }
  if (end_offset - tensor.offset != expected_bytes) {
    throw InputError(path, pointer + "/data_offsets",
                     "end - begin = " + std::to_string(expected_bytes) + " bytes (shape " +
                         shapeToString(tensor.shape) + " of " + tensor.dtype + "), got " +
                         std::to_string(end_offset - tensor.offset));
  }
  tensor.byte_size = expected_bytes;
  return tensor;
}

// Closes a file descriptor on every path out of open().
struct FileDescriptor {
  int fd = -1;
  ~FileDescriptor() {
    if (fd >= 0) ::close(fd);
  }
};

}  // namespace

std::size_t safetensorsItemSize(const std::string& dtype) {
  static const std::map<std::string, std::size_t> sizes = {
      {"BOOL", 1}, {"U8", 1},  {"I8", 1},  {"F8_E4M3", 1}, {"F8_E5M2", 1},
      {"U16", 2},  {"I16", 2}, {"F16", 2}, {"BF16", 2},    {"U32", 4},
      {"I32", 4},  {"F32", 4}, {"U64", 8}, {"I64", 8},     {"F64", 8}};
  const auto it = sizes.find(dtype);
  return it == sizes.end() ? 0 : it->second;
}

std::int64_t elementCount(const std::vector<std::int64_t>& shape) {
  std::int64_t count = 1;
  for (std::int64_t dim : shape) {
    if (dim < 0) throw std::invalid_argument("negative dimension in shape " + shapeToString(shape));
    if (__builtin_mul_overflow(count, dim, &count)) {
      throw std::invalid_argument("element count of shape " + shapeToString(shape) + " overflows");
    }
  }
  return count;
}

std::string shapeToString(const std::vector<std::int64_t>& shape) {
  std::string text = "[";
  for (std::size_t i = 0; i < shape.size(); ++i) text += (i ? ", " : "") + std::to_string(shape[i]);
  return text + "]";
}

void writeSafetensors(const std::string& path, const std::vector<NamedTensor>& tensors,
                      const std::map<std::string, std::string>& metadata) {
  nlohmann::ordered_json header = nlohmann::ordered_json::object();
  if (!metadata.empty()) header[kMetadataKey] = metadata;
  std::set<std::string> names;
  std::uint64_t offset = 0;
  for (const NamedTensor& t : tensors) {
    const std::string where = "safetensors " + path + ": tensor \"" + t.name + "\": ";
    if (t.name.empty() || t.name == kMetadataKey) throw std::invalid_argument(where + "invalid name");
    if (!names.insert(t.name).second) throw std::invalid_argument(where + "duplicate name");
    const std::size_t item_size = safetensorsItemSize(t.dtype);
    if (item_size == 0) throw std::invalid_argument(where + "unknown dtype \"" + t.dtype + "\"");
    const std::uint64_t expected = static_cast<std::uint64_t>(elementCount(t.shape)) * item_size;
    if (t.bytes.size() != expected) {
      throw std::invalid_argument(where + "holds " + std::to_string(t.bytes.size()) + " bytes, shape " +
                                  shapeToString(t.shape) + " of " + t.dtype + " needs " +
                                  std::to_string(expected));
    }
    header[t.name] = {{"dtype", t.dtype}, {"shape", t.shape}, {"data_offsets", {offset, offset + expected}}};
    offset += expected;
  }
  std::string header_text = header.dump();
  // Pad so that the data buffer begins at an 8-byte-aligned file offset (8 + N = 0 mod 8).
  header_text.append((8 - header_text.size() % 8) % 8, ' ');

  std::string content;
  content.reserve(8 + header_text.size() + offset);
  appendLittleEndian(content, header_text.size(), 8);
  content += header_text;
  for (const NamedTensor& t : tensors) content.append(t.bytes.begin(), t.bytes.end());
  writeFileAtomically(path, content);
}

SafetensorsView SafetensorsView::open(const std::string& path, bool prefault) {
  // O_NONBLOCK: opening a FIFO must not wait for a writer (it is refused below as not a regular file).
  FileDescriptor file{::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK)};
  if (file.fd < 0) {
    throw InputError(path, "", std::string("a readable safetensors file (") + std::strerror(errno) + ")");
  }
  struct stat status {};
  if (::fstat(file.fd, &status) != 0) {
    throw InputError(path, "", std::string("a readable safetensors file (") + std::strerror(errno) + ")");
  }
  if (S_ISDIR(status.st_mode)) throw InputError(path, "", "a readable safetensors file, got a directory");
  if (!S_ISREG(status.st_mode)) {
    throw InputError(path, "", "a regular safetensors file, got a FIFO, socket or device");
  }
  SafetensorsView view;
  view.path_ = path;
  view.file_size_ = static_cast<std::uint64_t>(status.st_size);
  const std::uint64_t file_size = view.file_size_;
  if (file_size < 8) {
    throw InputError(path, "", "at least 8 bytes (the u64 header length), the file has " +
                                   std::to_string(file_size));
  }
  void* base = ::mmap(nullptr, file_size, PROT_READ, MAP_PRIVATE | (prefault ? MAP_POPULATE : 0), file.fd, 0);
  if (base == MAP_FAILED) {
    throw InputError(path, "",
                     std::string("a file that can be memory-mapped (") + std::strerror(errno) + ")");
  }
  view.mapping_ = std::shared_ptr<const void>(
      base, [file_size](const void* address) { ::munmap(const_cast<void*>(address), file_size); });
  const auto* bytes = static_cast<const std::uint8_t*>(base);

  const std::uint64_t header_size = readLittleEndian(bytes, 8);
  if (header_size > file_size - 8) {
    throw InputError(path, "", "a header length within the file (at most " +
                                   std::to_string(file_size - 8) + " bytes), got " +
                                   std::to_string(header_size) + " (truncated or not a safetensors file)");
  }
  if (header_size > kMaxHeaderBytes) {
    throw InputError(path, "", "a header of at most " + std::to_string(kMaxHeaderBytes) +
                                   " bytes, got " + std::to_string(header_size));
  }
  const std::string_view header_text(reinterpret_cast<const char*>(bytes + 8), header_size);
  // No key twice (a repeated tensor name would silently shadow the first), anywhere in the header.
  const nlohmann::json header = json_input::parseJsonStrict(header_text, path, "", "a JSON header", false);
  if (!header.is_object()) {
    throw InputError(path, "", "a JSON object as header, got " + std::string(header.type_name()));
  }

  const std::uint64_t data_start = 8 + header_size;
  const std::uint64_t buffer_size = file_size - data_start;
  std::vector<std::uint64_t> ends;
  for (const auto& [name, entry] : header.items()) {
    if (name == kMetadataKey) {
      if (!entry.is_object()) throw InputError(path, pointerTo(name), "an object of string values");
      for (const auto& [key, value] : entry.items()) {
        if (!value.is_string()) {
          throw InputError(path, pointerTo(name) + pointerTo(key), "a string, got " + value.dump());
        }
        view.metadata_[key] = value.get<std::string>();
      }
      continue;
    }
    std::uint64_t end = 0;
    view.tensors_.push_back(parseEntry(path, name, entry, buffer_size, end));
    ends.push_back(end);
  }

  // File order; then any two non-empty tensors must not share a byte.
  std::vector<std::size_t> order(view.tensors_.size());
  for (std::size_t i = 0; i < order.size(); ++i) order[i] = i;
  std::stable_sort(order.begin(), order.end(), [&](std::size_t a, std::size_t b) {
    const TensorView &ta = view.tensors_[a], &tb = view.tensors_[b];
    return ta.offset != tb.offset ? ta.offset < tb.offset : ends[a] < ends[b];
  });
  std::size_t previous = order.size();
  for (std::size_t index : order) {
    const TensorView& current = view.tensors_[index];
    if (current.byte_size == 0) continue;
    if (previous != order.size() && current.offset < ends[previous]) {
      const TensorView& before = view.tensors_[previous];
      throw InputError(path, pointerTo(current.name) + "/data_offsets",
                       "bytes not shared with another tensor, but [" + std::to_string(current.offset) +
                           ", " + std::to_string(ends[index]) + ") overlaps tensor \"" + before.name +
                           "\" at [" + std::to_string(before.offset) + ", " + std::to_string(ends[previous]) +
                           ")");
    }
    previous = index;
  }

  std::vector<TensorView> ordered;
  ordered.reserve(order.size());
  for (std::size_t index : order) {
    TensorView& tensor = view.tensors_[index];
    tensor.data = bytes + data_start + tensor.offset;
    view.index_.emplace(tensor.name, ordered.size());
    ordered.push_back(std::move(tensor));
  }
  view.tensors_ = std::move(ordered);
  return view;
}

const TensorView* SafetensorsView::find(const std::string& name) const {
  const auto it = index_.find(name);
  return it == index_.end() ? nullptr : &tensors_[it->second];
}

SafetensorsFile readSafetensorsFile(const std::string& path) {
  const SafetensorsView view = SafetensorsView::open(path, /*prefault=*/true);
  SafetensorsFile file;
  file.metadata = view.metadata();
  file.tensors.reserve(view.tensors().size());
  for (const TensorView& t : view.tensors()) {
    file.tensors.push_back(
        NamedTensor{t.name, t.dtype, t.shape, std::vector<std::uint8_t>(t.data, t.data + t.byte_size)});
  }
  return file;
}

std::vector<NamedTensor> readSafetensors(const std::string& path) {
  return readSafetensorsFile(path).tensors;
}

void releaseResidentPages(const void* address, std::size_t bytes) noexcept {
  if (address == nullptr || bytes == 0) return;
  const auto page = static_cast<std::uintptr_t>(::sysconf(_SC_PAGESIZE));
  const auto begin = reinterpret_cast<std::uintptr_t>(address) / page * page;
  const auto end = (reinterpret_cast<std::uintptr_t>(address) + bytes + page - 1) / page * page;
  ::madvise(reinterpret_cast<void*>(begin), end - begin, MADV_DONTNEED);
}

NamedTensor makeF64Tensor(std::string name, std::vector<std::int64_t> shape,
                          const std::vector<double>& values) {
  if (elementCount(shape) != static_cast<std::int64_t>(values.size())) {
    throw std::invalid_argument("tensor \"" + name + "\": " + std::to_string(values.size()) +
                                " values for shape " + shapeToString(shape));
  }
  NamedTensor tensor{std::move(name), "F64", std::move(shape), {}};
  tensor.bytes.resize(values.size() * 8);
  for (std::size_t i = 0; i < values.size(); ++i) {
    std::uint64_t bits;
    std::memcpy(&bits, &values[i], 8);
    for (int b = 0; b < 8; ++b) tensor.bytes[i * 8 + b] = static_cast<std::uint8_t>(bits >> (8 * b));
  }
  return tensor;
}

NamedTensor makeU8Tensor(std::string name, std::vector<std::int64_t> shape,
                         const std::vector<std::uint8_t>& values) {
  if (elementCount(shape) != static_cast<std::int64_t>(values.size())) {
    throw std::invalid_argument("tensor \"" + name + "\": " + std::to_string(values.size()) +
                                " values for shape " + shapeToString(shape));
  }
  return NamedTensor{std::move(name), "U8", std::move(shape), values};
}

std::vector<double> tensorAsF64(const NamedTensor& tensor, const std::string& file_for_errors) {
  const std::size_t item_size = tensor.dtype == "F64" ? 8 : tensor.dtype == "F32" ? 4 : 0;
  if (item_size == 0) {
    throw InputError(file_for_errors, pointerTo(tensor.name),
                     "dtype F64 or F32, got " + tensor.dtype);
  }
  if (tensor.bytes.size() % item_size != 0) {
    throw InputError(file_for_errors, pointerTo(tensor.name),
                     "a whole number of " + tensor.dtype + " elements, got " +
                         std::to_string(tensor.bytes.size()) + " bytes");
  }
  std::vector<double> values(tensor.bytes.size() / item_size);
  for (std::size_t i = 0; i < values.size(); ++i) {
    const std::uint64_t bits = readLittleEndian(tensor.bytes.data() + i * item_size, static_cast<int>(item_size));
    if (item_size == 8) {
      std::memcpy(&values[i], &bits, 8);
    } else {
      const auto bits32 = static_cast<std::uint32_t>(bits);
      float f;
      std::memcpy(&f, &bits32, 4);
      values[i] = f;
    }
  }
  return values;
}

}  // namespace moe
