// Strict JSON input shared by the readers of user files (safetensors headers, capture manifests):
// one document, no key twice in an object, syntax errors by line and column, and JSON Pointers in
// every message. Every problem is an InputError; nothing here exits or aborts.
//
// The scenario reader (scenario.cpp) keeps its own copy of DuplicateKeyGuard and didYouMean; they
// follow the same rules and can move onto these.
#pragma once

#include <cstddef>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include <nlohmann/json.hpp>

namespace moe {

// One JSON Pointer segment, escaped per RFC 6901 ('~' -> "~0", '/' -> "~1").
std::string jsonPointerSegment(std::string_view key);

// Parses `text` as one JSON document. Throws InputError(file, <pointer of the repeated key>, ...) on
// a key that occurs twice in the same object (the message says "occurs once"), and
// InputError(file, document_pointer, "<what_document> ...: invalid JSON at line L, column C ...") on
// a syntax error or a number too large for a double.
//
// With `mark_non_finite`, the literals NaN, Infinity and -Infinity (which Python's json.dumps writes
// by default) and numbers beyond the double range are accepted by the parser as marker strings, so
// that the reader can refuse them *by key*; see nonFiniteLiteral.
nlohmann::json parseJsonStrict(std::string_view text, const std::string& file,
                               const std::string& document_pointer, const std::string& what_document,
                               bool mark_non_finite);

// The original literal ("NaN", "-Infinity", "1e999") when `value` is a marker made by
// parseJsonStrict(..., mark_non_finite = true); nullopt for every other value.
std::optional<std::string> nonFiniteLiteral(const nlohmann::json& value);

// A short rendering of a value for "got ..." in messages: "an object", "an array", the literal of a
// non-finite marker, or the JSON text (cut at 60 characters).
std::string describeJson(const nlohmann::json& value);

// " (did you mean "x"?)" when one candidate is close to `given` (edit distance), else "".
std::string didYouMean(const std::string& given, const std::vector<std::string>& candidates);

// "a, b, c"
std::string joinNames(const std::vector<std::string>& names);

}  // namespace moe
