// The float element types of capture files (IEEE binary64, binary32, binary16 and bfloat16, all
// little-endian): exact widening to double, rounding from double (for writers), finiteness scans and
// distances in units in the last place. Written out rather than taken from a library so that the
// torch-free build needs nothing beyond the C++ standard library, and hand-checked bit by bit in
// tests/base/test_capture.cpp.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "capture/capture.hpp"

namespace moe {

// One row per element type: its safetensors name, bytes per element, significand bits including the
// implicit one (the finer a type, the larger) and the exponent of its smallest normal number.
struct CaptureFloatFormat {
  CaptureFloat dtype;
  const char* name;
  std::size_t bytes;
  int precision;
  int min_exponent;
};
inline constexpr CaptureFloatFormat kCaptureFloatFormats[] = {
    {CaptureFloat::kF64, "F64", 8, 53, -1022},
    {CaptureFloat::kF32, "F32", 4, 24, -126},
    {CaptureFloat::kBF16, "BF16", 2, 8, -126},
    {CaptureFloat::kF16, "F16", 2, 11, -14},
};
constexpr const CaptureFloatFormat& captureFloatFormat(CaptureFloat dtype) {
  for (const CaptureFloatFormat& format : kCaptureFloatFormats)
    if (format.dtype == dtype) return format;
  return kCaptureFloatFormats[0];
}

// Bytes per element: 8, 4, 2, 2.
constexpr std::size_t captureFloatSize(CaptureFloat dtype) { return captureFloatFormat(dtype).bytes; }

// Significand bits including the implicit one (53, 24, 8, 11).
constexpr int captureFloatPrecision(CaptureFloat dtype) { return captureFloatFormat(dtype).precision; }

// The safetensors dtype name ("F64", "F32", "BF16", "F16") as a CaptureFloat; false for any other.
bool parseCaptureFloat(const std::string& safetensors_dtype, CaptureFloat& out);

// Little-endian loads from any address (the data of a mapped tensor has no alignment guarantee).
inline std::uint16_t loadLittleEndian16(const std::uint8_t* p) {
  return static_cast<std::uint16_t>(p[0] | (p[1] << 8));
}
// Unsigned loads of 4 or 8 bytes (std::uint32_t, std::uint64_t).
template <typename Unsigned>
Unsigned loadLittleEndian(const std::uint8_t* p) {
  Unsigned v;
  std::memcpy(&v, p, sizeof(Unsigned));
#if __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
  if constexpr (sizeof(Unsigned) == 8)
    v = __builtin_bswap64(v);
  else
    v = __builtin_bswap32(v);
#endif
  return v;
}
inline std::uint32_t loadLittleEndian32(const std::uint8_t* p) { return loadLittleEndian<std::uint32_t>(p); }
inline std::uint64_t loadLittleEndian64(const std::uint8_t* p) { return loadLittleEndian<std::uint64_t>(p); }

// bfloat16 is the upper half of a binary32: widening is a shift, exact for every pattern.
inline float bf16ToFloat(std::uint16_t bits) {
  const std::uint32_t wide = static_cast<std::uint32_t>(bits) << 16;
  float value;
  std::memcpy(&value, &wide, 4);
  return value;
}

// binary16 -> binary32, exact for every pattern: normals re-biased (15 -> 127), subnormals
// (mantissa * 2^-24, a normal binary32) scaled exactly, infinities and NaNs (payload kept) mapped.
inline float f16ToFloat(std::uint16_t bits) {
  const std::uint32_t sign = static_cast<std::uint32_t>(bits & 0x8000u) << 16;
  const std::uint32_t exponent = (bits >> 10) & 0x1fu;
  const std::uint32_t mantissa = bits & 0x3ffu;
  std::uint32_t wide;
  if (exponent == 0x1f) {
    wide = sign | 0x7f800000u | (mantissa << 13);
  } else if (exponent != 0) {
    wide = sign | ((exponent + 112u) << 23) | (mantissa << 13);
  } else {
    const float magnitude = static_cast<float>(mantissa) * 0x1p-24f;  // exact: < 2^10 * 2^-24
    return sign ? -magnitude : magnitude;                             // mantissa 0: +-0
  }
  float value;
  std::memcpy(&value, &wide, 4);
  return value;
}

// Element i of a little-endian array of `dtype`, as double (exact).
inline double loadCaptureFloat(const std::uint8_t* data, std::size_t i, CaptureFloat dtype) {
  switch (dtype) {
    case CaptureFloat::kF64: {
      const std::uint64_t bits = loadLittleEndian64(data + 8 * i);
      double value;
      std::memcpy(&value, &bits, 8);
      return value;
    }
    case CaptureFloat::kF32: {
      const std::uint32_t bits = loadLittleEndian32(data + 4 * i);
      float value;
      std::memcpy(&value, &bits, 4);
      return value;
    }
    case CaptureFloat::kBF16:
      return bf16ToFloat(loadLittleEndian16(data + 2 * i));
    case CaptureFloat::kF16:
      return f16ToFloat(loadLittleEndian16(data + 2 * i));
  }
  return 0.0;
}

// count elements of `dtype` at `data` to double, into out[0 .. count).
void convertToDouble(const std::uint8_t* data, std::size_t count, CaptureFloat dtype, double* out);

// Round to nearest, ties to even, from double: overflow to +-infinity, NaN to a quiet NaN, signed
// zeros kept, subnormal results where the type has them. For writers of capture files.
std::uint16_t doubleToBf16(double value);
std::uint16_t doubleToF16(double value);

// `values` encoded as little-endian `dtype` (F32 by the C++ conversion, which rounds to nearest even).
void appendEncoded(std::vector<std::uint8_t>& out, const double* values, std::size_t count,
                   CaptureFloat dtype);

// Index of the first NaN or infinity among count elements, or -1 when every element is finite.
std::int64_t firstNonFinite(const std::uint8_t* data, std::size_t count, CaptureFloat dtype);

// Distance in units in the last place of `dtype` between elements of two arrays of that dtype: the
// number of representable values from one to the other (+0 and -0 are the same value; finite input).
std::uint64_t ulpDistance(const std::uint8_t* a, const std::uint8_t* b, std::size_t i, CaptureFloat dtype);

// The spacing of `dtype` at magnitude |x| (its unit in the last place there; the subnormal spacing
// below the normal range).
double ulpOf(CaptureFloat dtype, double x);

}  // namespace moe
