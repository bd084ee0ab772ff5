// Reading JSON that a user or another program wrote (scenario files, capture manifests, safetensors
// headers): parsers that report syntax errors by line and column and repeated keys, nesting too deep
// and out-of-range numbers by JSON Pointer, plus the small helpers every reader of such input uses for
// its messages. Every problem is an InputError; nothing here exits or aborts.
#pragma once

#include <cstddef>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include <nlohmann/json.hpp>

namespace moe::json_input {

using Json = nlohmann::json;

// Parses `text` as one JSON document (a scenario file). Throws InputError(file, "", "invalid JSON at
// line L, column C (byte B): ...") on a syntax error, InputError(file, "/path/of/key", "key \"k\"
// appears twice in the same object") on a repeated key, and InputError(file, "/path", "a number
// within the range of a double, got ...") for a number no double can hold (1e400). Nesting deeper
// than `max_depth` is refused the same way, before the parser goes deeper.
Json parseDocument(const std::string& text, const std::string& file, int max_depth = 64);

// Parses a JSON document embedded in a file (a safetensors header, a capture manifest): errors name
// `document_pointer` and read "<what_document>, got invalid JSON at line L, column C: ..."; a repeated
// key is named by its pointer ("a key that occurs once in its object; \"k\" appears twice"). With
// `mark_non_finite`, the literals NaN, Infinity and -Infinity (which Python's json.dumps writes by
// default) and numbers beyond the double range are accepted as marker strings, so that the reader
// can refuse them *by key* (see nonFiniteLiteral).
Json parseJsonStrict(std::string_view text, const std::string& file, const std::string& document_pointer,
                     const std::string& what_document, bool mark_non_finite, int max_depth = 64);

// The original literal ("NaN", "-Infinity", "1e999") when `value` is a marker made by
// parseJsonStrict(..., mark_non_finite = true); nullopt for every other value.
std::optional<std::string> nonFiniteLiteral(const Json& value);

// One JSON Pointer segment, escaped per RFC 6901 ('~' -> "~0", '/' -> "~1").
std::string jsonPointerSegment(std::string_view key);
// `parent` with one more segment.
std::string childPath(const std::string& parent, const std::string& key);
std::string childPath(const std::string& parent, std::size_t index);

// " (did you mean "x"?)" when one candidate is close to `given` (edit distance), else "".
std::string didYouMean(const std::string& given, const std::vector<std::string>& candidates);

// A short rendering of a value for "got ..." in messages: "an object", "an array", the literal of a
// non-finite marker, or the JSON text (cut at 60 characters; invalid UTF-8 replaced).
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
