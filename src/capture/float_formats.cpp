#include "capture/float_formats.hpp"

#include <algorithm>
#include <cmath>

namespace moe {
namespace {

// Rounds |value| to the binary format with `mantissa_bits` stored fraction bits, normal exponents
// [min_exponent, max_exponent] and `bias`, to nearest with ties to even; returns the 16-bit pattern.
std::uint16_t roundToNarrow(double value, int mantissa_bits, int min_exponent, int max_exponent, int bias) {
  const std::uint16_t sign = std::signbit(value) ? 0x8000u : 0u;
  const std::uint16_t exponent_all_ones =
      static_cast<std::uint16_t>(((1u << (15 - mantissa_bits)) - 1u) << mantissa_bits);
  if (std::isnan(value))
    return static_cast<std::uint16_t>(sign | exponent_all_ones | (1u << (mantissa_bits - 1)));
  const double magnitude = std::fabs(value);
  if (magnitude == 0.0) return sign;
  if (std::isinf(magnitude)) return sign | exponent_all_ones;
  int binary_exponent = 0;
  std::frexp(magnitude, &binary_exponent);  // magnitude in [2^(e-1), 2^e)
  int exponent = std::max(binary_exponent - 1, min_exponent);
  // magnitude / quantum is exact (a power-of-two scaling) and lies in [0, 2^(mantissa_bits + 1));
  // nearbyint rounds it to an integer in the default rounding mode, to nearest with ties to even.
  const double quantum = std::ldexp(1.0, exponent - mantissa_bits);
  double units = std::nearbyint(magnitude / quantum);
  if (units == std::ldexp(1.0, mantissa_bits + 1)) {  // rounded up into the next binade
    units = std::ldexp(1.0, mantissa_bits);
    ++exponent;
  }
  if (exponent > max_exponent) return sign | exponent_all_ones;  // overflow: infinity
  const auto integer_units = static_cast<std::uint32_t>(units);
  if (integer_units < (1u << mantissa_bits))
    return static_cast<std::uint16_t>(sign | integer_units);  // subnormal
  const auto biased = static_cast<std::uint32_t>(exponent + bias);
  return static_cast<std::uint16_t>(sign | (biased << mantissa_bits) |
                                    (integer_units - (1u << mantissa_bits)));
}

// The first index whose |bits| (sign cleared) reaches the all-ones exponent, i.e. an infinity or NaN.
// Blocks of a fixed size with a max reduction let the compiler vectorise the common all-finite case.
template <typename Bits, Bits kMagnitudeMask, Bits kInfinity>
std::int64_t firstNonFiniteOf(const std::uint8_t* data, std::size_t count) {
  constexpr std::size_t kBlock = 1024;
  std::size_t start = 0;
  while (start < count) {
    const std::size_t n = std::min(kBlock, count - start);
    const std::uint8_t* block = data + start * sizeof(Bits);
    Bits largest = 0;
    if (n == kBlock) {
      for (std::size_t i = 0; i < kBlock; ++i) {
        Bits bits;
        std::memcpy(&bits, block + i * sizeof(Bits), sizeof(Bits));
        largest = std::max<Bits>(largest, static_cast<Bits>(bits & kMagnitudeMask));
      }
    } else {
      largest = kInfinity;  // the tail: let the exact scan below decide
    }
    if (largest >= kInfinity) {
      for (std::size_t i = 0; i < n; ++i) {
        Bits bits;
        std::memcpy(&bits, block + i * sizeof(Bits), sizeof(Bits));
        if ((bits & kMagnitudeMask) >= kInfinity) return static_cast<std::int64_t>(start + i);
      }
    }
    start += n;
  }
  return -1;
}

}  // namespace

bool parseCaptureFloat(const std::string& safetensors_dtype, CaptureFloat& out) {
  for (const CaptureFloatFormat& format : kCaptureFloatFormats) {
    if (safetensors_dtype == format.name) {
      out = format.dtype;
      return true;
    }
  }
  return false;
}

void convertToDouble(const std::uint8_t* data, std::size_t count, CaptureFloat dtype, double* out) {
  switch (dtype) {
    case CaptureFloat::kF64:
      for (std::size_t i = 0; i < count; ++i) out[i] = loadCaptureFloat(data, i, CaptureFloat::kF64);
      return;
    case CaptureFloat::kF32:
      for (std::size_t i = 0; i < count; ++i) out[i] = loadCaptureFloat(data, i, CaptureFloat::kF32);
      return;
    case CaptureFloat::kBF16:
      for (std::size_t i = 0; i < count; ++i) out[i] = bf16ToFloat(loadLittleEndian16(data + 2 * i));
      return;
    case CaptureFloat::kF16:
      for (std::size_t i = 0; i < count; ++i) out[i] = f16ToFloat(loadLittleEndian16(data + 2 * i));
      return;
  }
}

std::uint16_t doubleToBf16(double value) { return roundToNarrow(value, 7, -126, 127, 127); }
std::uint16_t doubleToF16(double value) { return roundToNarrow(value, 10, -14, 15, 15); }

void appendEncoded(std::vector<std::uint8_t>& out, const double* values, std::size_t count,
                   CaptureFloat dtype) {
  const auto append = [&out](std::uint64_t bits, int bytes) {
    for (int b = 0; b < bytes; ++b) out.push_back(static_cast<std::uint8_t>(bits >> (8 * b)));
  };
  out.reserve(out.size() + count * captureFloatSize(dtype));
  for (std::size_t i = 0; i < count; ++i) {
    switch (dtype) {
      case CaptureFloat::kF64: {
        std::uint64_t bits;
        std::memcpy(&bits, &values[i], 8);
        append(bits, 8);
        break;
      }
      case CaptureFloat::kF32: {
        const float narrow = static_cast<float>(values[i]);
        std::uint32_t bits;
        std::memcpy(&bits, &narrow, 4);
        append(bits, 4);
        break;
      }
      case CaptureFloat::kBF16:
        append(doubleToBf16(values[i]), 2);
        break;
      case CaptureFloat::kF16:
        append(doubleToF16(values[i]), 2);
        break;
    }
  }
}

std::int64_t firstNonFinite(const std::uint8_t* data, std::size_t count, CaptureFloat dtype) {
  // Little-endian data read in host order: on a big-endian host the masks would need swapping.
  static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "the finiteness scan reads little-endian words");
  switch (dtype) {
    case CaptureFloat::kF64:
      return firstNonFiniteOf<std::uint64_t, 0x7fffffffffffffffull, 0x7ff0000000000000ull>(data, count);
    case CaptureFloat::kF32:
      return firstNonFiniteOf<std::uint32_t, 0x7fffffffu, 0x7f800000u>(data, count);
    case CaptureFloat::kBF16:
      return firstNonFiniteOf<std::uint16_t, 0x7fff, 0x7f80>(data, count);
    case CaptureFloat::kF16:
      return firstNonFiniteOf<std::uint16_t, 0x7fff, 0x7c00>(data, count);
  }
  return -1;
}

std::uint64_t ulpDistance(const std::uint8_t* a, const std::uint8_t* b, std::size_t i, CaptureFloat dtype) {
  std::uint64_t bits_a = 0, bits_b = 0;
  int width = 0;
  switch (dtype) {
    case CaptureFloat::kF64:
      bits_a = loadLittleEndian64(a + 8 * i), bits_b = loadLittleEndian64(b + 8 * i), width = 64;
      break;
    case CaptureFloat::kF32:
      bits_a = loadLittleEndian32(a + 4 * i), bits_b = loadLittleEndian32(b + 4 * i), width = 32;
      break;
    case CaptureFloat::kBF16:
    case CaptureFloat::kF16:
      bits_a = loadLittleEndian16(a + 2 * i), bits_b = loadLittleEndian16(b + 2 * i), width = 16;
      break;
  }
  // Sign-magnitude patterns of finite values are ordered by their magnitude field on each side of
  // zero: the distance is the difference of magnitudes, or their sum across zero.
  const std::uint64_t sign = 1ull << (width - 1);
  const std::uint64_t magnitude_a = bits_a & (sign - 1), magnitude_b = bits_b & (sign - 1);
  if ((bits_a & sign) == (bits_b & sign)) {
    return magnitude_a > magnitude_b ? magnitude_a - magnitude_b : magnitude_b - magnitude_a;
  }
  return magnitude_a + magnitude_b;
}

double ulpOf(CaptureFloat dtype, double x) {
  const int precision = captureFloatPrecision(dtype);
  const int min_exponent = captureFloatFormat(dtype).min_exponent;  // of the smallest normal number
  int binary_exponent = 0;
  std::frexp(std::fabs(x), &binary_exponent);  // |x| in [2^(e-1), 2^e)
  const int exponent = x == 0.0 ? min_exponent : std::max(binary_exponent - 1, min_exponent);
  return std::ldexp(1.0, exponent - (precision - 1));
}

}  // namespace moe
