// Reading JSON that a user or another program wrote (scenario files, capture manifests): one parser
// entry point that reports syntax errors by line and column, repeated keys and out-of-range numbers by
// JSON Pointer, plus the small helpers every reader of such input uses for its messages.
#pragma once

#include <cstddef>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

namespace moe::json_input {

using Json = nlohmann::json;

// Parses `text` as one JSON document. Throws InputError(file, "", "invalid JSON at line L, column C
// (byte B): ...") on a syntax error, InputError(file, "/path/of/key", "key \"k\" appears twice in the
// same object") on a repeated key, and InputError(file, "/path", "number ... is out of range") for a
// number no double can hold (1e400). Nesting deeper than `max_depth` is refused the same way, before
// the parser recurses further.
Json parseDocument(const std::string& text, const std::string& file, int max_depth = 64);

// One JSON Pointer segment, escaped per RFC 6901 (~ -> ~0, / -> ~1), appended to `parent`.
std::string childPath(const std::string& parent, const std::string& key);
std::string childPath(const std::string& parent, std::size_t index);

// " (did you mean "x"?)" when one candidate is close to `given`, else "".
std::string didYouMean(const std::string& given, const std::vector<std::string>& candidates);

// A short rendering of a JSON value for "got ..." in messages ("an object", "an array", or the
// value's text cut at 60 characters; invalid UTF-8 replaced).
std::string describe(const Json& value);

// "a, b, c" (each wrapped in `quote`).
std::string joinNames(const std::vector<std::string>& names, const char* quote = "");

// Throws InputError(file, "<path>/<key>", "unknown key ...; allowed keys in <path>: ...") for the
// first key of `object` that is not in `allowed`.
void rejectUnknownKeys(const Json& object, const std::string& file, const std::string& path,
                       const std::vector<std::string>& allowed);

// Shortest text that reads back as the same double (for messages).
std::string numberText(double value);

}  // namespace moe::json_input
