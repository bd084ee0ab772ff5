#include "data/safetensors.hpp"

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <fstream>
#include <set>
#include <stdexcept>

#include <nlohmann/json.hpp>

#include "common/errors.hpp"
#include "report/reporters.hpp"  // writeFileAtomically

namespace moe {
namespace {

constexpr const char* kMetadataKey = "__metadata__";
// The reference implementation refuses headers above 100 MB; so do we (and never allocate more).
constexpr std::uint64_t kMaxHeaderBytes = 100'000'000;

// JSON pointer of a tensor entry (RFC 6901 escaping of '~' and '/').
std::string pointerTo(const std::string& name) {
  std::string pointer = "/";
  for (char ch : name) {
    if (ch == '~') pointer += "~0";
    else if (ch == '/') pointer += "~1";
    else pointer += ch;
  }
  return pointer;
}

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

struct EntryLocation {
  std::string name;
  std::uint64_t begin = 0, end = 0;
};

// Parses and validates one tensor entry of the header (everything except overlap, which needs all
// entries). The bytes are read later.
NamedTensor parseEntry(const std::string& path, const std::string& name, const nlohmann::json& entry,
                       std::uint64_t buffer_size, EntryLocation& location) {
  const std::string pointer = pointerTo(name);
  if (!entry.is_object()) {
    throw InputError(path, pointer, "an object with dtype, shape and data_offsets, got " +
                                        std::string(entry.type_name()));
  }
  NamedTensor tensor;
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
    if (!dim.is_number_integer() || dim.get<std::int64_t>() < 0) {
      throw InputError(path, pointer + "/shape/" + std::to_string(i),
                       "a non-negative integer, got " + dim.dump());
    }
    tensor.shape.push_back(dim.get<std::int64_t>());
  }
  std::int64_t elements = 0;
  try {
    elements = elementCount(tensor.shape);
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
  location.name = name;
  location.begin = (*offsets)[0].get<std::uint64_t>();
  location.end = (*offsets)[1].get<std::uint64_t>();
  if (location.begin > location.end || location.end > buffer_size) {
    throw InputError(path, pointer + "/data_offsets",
                     "0 <= begin <= end <= " + std::to_string(buffer_size) +
                         " (the data buffer size), got [" + std::to_string(location.begin) + ", " +
                         std::to_string(location.end) + "]");
  }
  const std::uint64_t expected_bytes = static_cast<std::uint64_t>(elements) * item_size;
  if (elements != 0 && expected_bytes / item_size != static_cast<std::uint64_t>(elements)) {
    throw InputError(path, pointer + "/shape", "a shape whose byte size fits in 64 bits");
  }
  if (location.end - location.begin != expected_bytes) {
    throw InputError(path, pointer + "/data_offsets",
                     "end - begin = " + std::to_string(expected_bytes) + " bytes (shape " +
                         shapeToString(tensor.shape) + " of " + tensor.dtype + "), got " +
                         std::to_string(location.end - location.begin));
  }
  return tensor;
}

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

SafetensorsFile readSafetensorsFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) {
    throw InputError(path, "", std::string("a readable safetensors file (") + std::strerror(errno) + ")");
  }
  in.seekg(0, std::ios::end);
  const std::streamoff file_size_signed = in.tellg();
  in.seekg(0, std::ios::beg);
  if (!in || file_size_signed < 0) throw InputError(path, "", "a regular, seekable file");
  const auto file_size = static_cast<std::uint64_t>(file_size_signed);
  if (file_size < 8) {
    throw InputError(path, "", "at least 8 bytes (the u64 header length), the file has " +
                                   std::to_string(file_size));
  }
  std::uint8_t length_bytes[8];
  in.read(reinterpret_cast<char*>(length_bytes), 8);
  const std::uint64_t header_size = readLittleEndian(length_bytes, 8);
  if (header_size > file_size - 8) {
    throw InputError(path, "", "a header length within the file (at most " +
                                   std::to_string(file_size - 8) + " bytes), got " +
                                   std::to_string(header_size) + " (truncated or not a safetensors file)");
  }
  if (header_size > kMaxHeaderBytes) {
    throw InputError(path, "", "a header of at most " + std::to_string(kMaxHeaderBytes) +
                                   " bytes, got " + std::to_string(header_size));
  }
  std::string header_text(header_size, '\0');
  in.read(header_text.data(), static_cast<std::streamsize>(header_size));
  if (!in) throw InputError(path, "", "a readable header of " + std::to_string(header_size) + " bytes");

  // Duplicate top-level names would silently shadow each other in a JSON object: refuse them.
  std::set<std::string> seen_names;
  std::string duplicate;
  const nlohmann::json::parser_callback_t on_event =
      [&](int depth, nlohmann::json::parse_event_t event, nlohmann::json& parsed) {
        if (event == nlohmann::json::parse_event_t::key && depth == 1 && parsed.is_string()) {
          if (!seen_names.insert(parsed.get<std::string>()).second && duplicate.empty()) {
            duplicate = parsed.get<std::string>();
          }
        }
        return true;
      };
  nlohmann::json header;
  try {
    header = nlohmann::json::parse(header_text, on_event);
  } catch (const nlohmann::json::parse_error& e) {
    throw InputError(path, "", std::string("a JSON header: ") + e.what());
  }
  if (!header.is_object()) {
    throw InputError(path, "", "a JSON object as header, got " + std::string(header.type_name()));
  }
  if (!duplicate.empty()) throw InputError(path, pointerTo(duplicate), "a name that occurs once in the header");

  SafetensorsFile file;
  const std::uint64_t data_start = 8 + header_size;
  const std::uint64_t buffer_size = file_size - data_start;
  std::vector<EntryLocation> locations;
  for (const auto& [name, entry] : header.items()) {
    if (name == kMetadataKey) {
      if (!entry.is_object()) throw InputError(path, pointerTo(name), "an object of string values");
      for (const auto& [key, value] : entry.items()) {
        if (!value.is_string()) {
          throw InputError(path, pointerTo(name) + pointerTo(key), "a string, got " + value.dump());
        }
        file.metadata[key] = value.get<std::string>();
      }
      continue;
    }
    EntryLocation location;
    file.tensors.push_back(parseEntry(path, name, entry, buffer_size, location));
    locations.push_back(location);
  }

  // File order; then any two non-empty tensors must not share a byte.
  std::vector<std::size_t> order(file.tensors.size());
  for (std::size_t i = 0; i < order.size(); ++i) order[i] = i;
  std::stable_sort(order.begin(), order.end(), [&](std::size_t a, std::size_t b) {
    return locations[a].begin != locations[b].begin ? locations[a].begin < locations[b].begin
                                                     : locations[a].end < locations[b].end;
  });
  const EntryLocation* previous = nullptr;
  for (std::size_t index : order) {
    const EntryLocation& current = locations[index];
    if (current.begin == current.end) continue;
    if (previous != nullptr && current.begin < previous->end) {
      throw InputError(path, pointerTo(current.name) + "/data_offsets",
                       "bytes not shared with another tensor, but [" + std::to_string(current.begin) +
                           ", " + std::to_string(current.end) + ") overlaps tensor \"" +
                           previous->name + "\" at [" + std::to_string(previous->begin) + ", " +
                           std::to_string(previous->end) + ")");
    }
    previous = &current;
  }

  std::vector<NamedTensor> ordered;
  ordered.reserve(order.size());
  for (std::size_t index : order) {
    NamedTensor& tensor = file.tensors[index];
    const EntryLocation& location = locations[index];
    tensor.bytes.resize(location.end - location.begin);
    if (!tensor.bytes.empty()) {
      in.seekg(static_cast<std::streamoff>(data_start + location.begin), std::ios::beg);
      in.read(reinterpret_cast<char*>(tensor.bytes.data()), static_cast<std::streamsize>(tensor.bytes.size()));
      if (!in) throw InputError(path, pointerTo(tensor.name), "readable data (the read failed)");
    }
    ordered.push_back(std::move(tensor));
  }
  file.tensors = std::move(ordered);
  return file;
}

std::vector<NamedTensor> readSafetensors(const std::string& path) {
  return readSafetensorsFile(path).tensors;
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
