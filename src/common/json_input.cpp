#include "common/json_input.hpp"

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <memory>
#include <set>
#include <utility>

#include <fmt/format.h>

#include "common/errors.hpp"

namespace moe::json_input {
namespace {

// Line and column (1-based) of a byte offset in `text`.
std::pair<std::size_t, std::size_t> lineAndColumn(std::string_view text, std::size_t byte) {
  std::size_t line = 1, column = 1;
  for (std::size_t i = 0; i < byte && i < text.size(); ++i) {
    if (text[i] == '\n') {
      ++line;
      column = 1;
    } else {
      ++column;
    }
  }
  return {line, column};
}

// The parser's syntax error without nlohmann's "[json.exception.parse_error.101] parse error at ...: "
// prefix.
std::string syntaxDetail(const Json::parse_error& e) {
  std::string detail = e.what();
  const std::size_t at = detail.find("parse error");
  const std::size_t colon = at == std::string::npos ? std::string::npos : detail.find(": ", at);
  if (colon != std::string::npos) detail = detail.substr(colon + 2);
  return detail;
}

// Where the parser is, as a JSON Pointer: kept by the parser callback, read when the parser stops
// (a repeated key, a nesting too deep, a number out of range) so that the error can name the value.
class PathTracker {
 public:
  // The pointer of the value the parser is reading now: inside an object the current key, inside
  // an array the next index (outer arrays: the index of the element being read).
  std::string pendingValuePath() const {
    std::string path;
    for (std::size_t i = 0; i < frames_.size(); ++i) {
      const Frame& f = frames_[i];
      const bool innermost = i + 1 == frames_.size();
      if (f.is_array)
        path = childPath(path, innermost ? f.next_index : f.next_index - 1);
      else if (f.has_key)
        path = childPath(path, f.current_key);
    }
    return path;
  }
  void enterValue() {
    if (!frames_.empty() && frames_.back().is_array) ++frames_.back().next_index;
  }
  void open(bool is_array) { frames_.push_back(Frame{is_array, false, {}, {}, 0}); }
  void close() {
    if (!frames_.empty()) frames_.pop_back();
  }
  // False when the key was already seen in the innermost object.
  bool key(const std::string& key) {
    Frame& frame = frames_.back();
    frame.current_key = key;
    frame.has_key = true;
    return frame.keys.insert(key).second;
  }
  std::size_t depth() const { return frames_.size(); }

 private:
  struct Frame {
    bool is_array;
    bool has_key;
    std::set<std::string> keys;
    std::string current_key;
    std::size_t next_index;
  };
  std::vector<Frame> frames_;
};

// The parser callback of both parsers: repeated keys and nesting depth, named by pointer.
Json::parser_callback_t trackingCallback(const std::shared_ptr<PathTracker>& tracker, const std::string& file,
                                         int max_depth, bool strict_wording) {
  return [tracker, file, max_depth, strict_wording](int, Json::parse_event_t event, Json& parsed) {
    switch (event) {
      case Json::parse_event_t::object_start:
      case Json::parse_event_t::array_start:
        if (tracker->depth() >= static_cast<std::size_t>(max_depth))
          throw InputError(file, tracker->pendingValuePath(), fmt::format("nesting deeper than {} levels", max_depth));
        tracker->enterValue();
        tracker->open(event == Json::parse_event_t::array_start);
        break;
      case Json::parse_event_t::key: {
        const std::string key = parsed.get<std::string>();
        if (!tracker->key(key))
          throw InputError(file, tracker->pendingValuePath(),
                           strict_wording ? "a key that occurs once in its object; \"" + key + "\" appears twice"
                                          : fmt::format("key \"{}\" appears twice in the same object", key));
        break;
      }
      case Json::parse_event_t::value:
        tracker->enterValue();
        break;
      case Json::parse_event_t::object_end:
      case Json::parse_event_t::array_end:
        tracker->close();
        break;
    }
    return true;
  };
}

// ", near /aux/coeff" for a syntax error inside the document (NaN, a byte that is not UTF-8, a file
// cut off): the value being read, or the one just read before a broken key, so that the message names
// a JSON path as well as the line; "" at the top level. The error's own JSON path stays empty: the
// document as a whole failed to parse.
std::string whereInDocument(const PathTracker& tracker) {
  const std::string path = tracker.pendingValuePath();
  return path.empty() ? std::string() : ", near " + path;
}

// A NUL cannot occur unescaped in JSON text, so no string of a real document reads back with this
// prefix unless it was written as "\u0000moe-lbcheck..." on purpose.
constexpr std::string_view kNonFinitePrefix{"\0moe-lbcheck:non-finite:", 24};

std::string markerFor(std::string_view literal) {
  std::string marker = "\"\\u0000moe-lbcheck:non-finite:";
  marker += literal;  // letters, digits, '+', '-', '.': nothing to escape
  marker += '"';
  return marker;
}

bool startsWith(std::string_view text, std::size_t at, std::string_view word) {
  return text.substr(at, word.size()) == word;
}

// Replaces NaN, Infinity, -Infinity and numbers that overflow a double by marker strings; everything
// else (strings included) is copied unchanged, so a document without them parses as before.
std::string markNonFiniteNumbers(std::string_view text) {
  std::string out;
  out.reserve(text.size());
  std::size_t i = 0;
  while (i < text.size()) {
    const char c = text[i];
    if (c == '"') {  // a string, copied through its closing quote
      const std::size_t start = i++;
      while (i < text.size() && text[i] != '"') i += text[i] == '\\' ? 2 : 1;
      i = std::min(i + 1, text.size());
      out.append(text.substr(start, i - start));
      continue;
    }
    bool marked = false;
    for (std::string_view word : {std::string_view("-Infinity"), std::string_view("Infinity"), std::string_view("NaN")}) {
      if (startsWith(text, i, word)) {
        out += markerFor(word);
        i += word.size();
        marked = true;
        break;
      }
    }
    if (marked) continue;
    if (c == '-' || (c >= '0' && c <= '9')) {
      const std::size_t start = i;
      while (i < text.size() && (std::string_view("0123456789+-.eE").find(text[i]) != std::string_view::npos)) ++i;
      const std::string token(text.substr(start, i - start));
      errno = 0;
      const double value = std::strtod(token.c_str(), nullptr);
      if (errno == ERANGE && std::isinf(value)) out += markerFor(token);
      else out += token;
      continue;
    }
    out += c;
    ++i;
  }
  return out;
}

// Edit distance, for "did you mean" hints on misspelt keys and names.
std::size_t editDistance(const std::string& a, const std::string& b) {
  std::vector<std::size_t> row(b.size() + 1);
  for (std::size_t j = 0; j <= b.size(); ++j) row[j] = j;
  for (std::size_t i = 1; i <= a.size(); ++i) {
    std::size_t diagonal = row[0];
    row[0] = i;
    for (std::size_t j = 1; j <= b.size(); ++j) {
      const std::size_t above = row[j];
      row[j] = std::min({row[j] + 1, row[j - 1] + 1, diagonal + (a[i - 1] == b[j - 1] ? 0 : 1)});
      diagonal = above;
    }
  }
  return row[b.size()];
}

}  // namespace

Json parseDocument(const std::string& text, const std::string& file, int max_depth) {
  auto tracker = std::make_shared<PathTracker>();
  try {
    return Json::parse(text, trackingCallback(tracker, file, max_depth, false), /*allow_exceptions=*/true,
                       /*ignore_comments=*/false);
  } catch (const Json::parse_error& e) {
    const auto [line, column] = lineAndColumn(text, e.byte > 0 ? e.byte - 1 : 0);
    throw InputError(file, "",
                     fmt::format("invalid JSON at line {}, column {} (byte {}){}: {}", line, column, e.byte,
                                 whereInDocument(*tracker), syntaxDetail(e)));
  } catch (const Json::out_of_range& e) {
    // nlohmann throws out_of_range 406 for a float literal no double holds (1e400).
    std::string detail = e.what();
    const std::size_t bracket = detail.find("] ");
    if (bracket != std::string::npos) detail = detail.substr(bracket + 2);
    throw InputError(file, tracker->pendingValuePath(),
                     fmt::format("a number within the range of a double, got {}", detail));
  } catch (const Json::exception& e) {
    throw InputError(file, tracker->pendingValuePath(), fmt::format("valid JSON: {}", e.what()));
  }
}

Json parseJsonStrict(std::string_view text, const std::string& file, const std::string& document_pointer,
                     const std::string& what_document, bool mark_non_finite, int max_depth) {
  std::string marked;
  if (mark_non_finite) {
    marked = markNonFiniteNumbers(text);
    text = marked;
  }
  auto tracker = std::make_shared<PathTracker>();
  try {
    return Json::parse(text.begin(), text.end(), trackingCallback(tracker, file, max_depth, true),
                       /*allow_exceptions=*/true, /*ignore_comments=*/false);
  } catch (const Json::parse_error& e) {
    const auto [line, column] = lineAndColumn(text, e.byte > 0 ? e.byte - 1 : 0);
    throw InputError(file, document_pointer,
                     what_document + ", got invalid JSON at line " + std::to_string(line) + ", column " +
                         std::to_string(column) + whereInDocument(*tracker) + ": " + syntaxDetail(e));
  } catch (const Json::out_of_range& e) {
    // out_of_range.406: a number beyond the double range, in a document read without marking it
    // (a safetensors header): named by its pointer, as parseDocument does.
    std::string detail = e.what();
    const std::size_t bracket = detail.find("] ");
    if (bracket != std::string::npos) detail = detail.substr(bracket + 2);
    // Named like the repeated keys and the nesting the callback refuses: by the path in the document.
    const std::string path = tracker->pendingValuePath();
    throw InputError(file, path.empty() ? document_pointer : path,
                     what_document + " with every number within the range of a double, got " + detail);
  } catch (const Json::exception& e) {
    const std::string path = tracker->pendingValuePath();
    throw InputError(file, path.empty() ? document_pointer : path,
                     what_document + ", got JSON it cannot read: " + e.what());
  }
}

std::optional<std::string> nonFiniteLiteral(const Json& value) {
  if (!value.is_string()) return std::nullopt;
  const std::string& text = value.get_ref<const std::string&>();
  if (text.size() <= kNonFinitePrefix.size() || std::string_view(text).substr(0, kNonFinitePrefix.size()) != kNonFinitePrefix)
    return std::nullopt;
  return text.substr(kNonFinitePrefix.size());
}

std::string jsonPointerSegment(std::string_view key) {
  std::string out;
  for (char c : key) {
    if (c == '~')
      out += "~0";
    else if (c == '/')
      out += "~1";
    else
      out += c;
  }
  return out;
}

std::string childPath(const std::string& parent, const std::string& key) {
  return parent + "/" + jsonPointerSegment(key);
}

std::string childPath(const std::string& parent, std::size_t index) { return parent + "/" + std::to_string(index); }

std::string didYouMean(const std::string& given, const std::vector<std::string>& candidates) {
  std::string best;
  std::size_t best_distance = std::numeric_limits<std::size_t>::max();
  for (const auto& c : candidates) {
    const std::size_t d = editDistance(given, c);
    if (d < best_distance) {
      best_distance = d;
      best = c;
    }
  }
  // Close enough: about a quarter of the longer name, and well under the shorter one (so that
  // "tp" does not suggest "dp").
  const std::size_t longer = std::max(given.size(), best.size());
  const std::size_t shorter = std::min(given.size(), best.size());
  if (best.empty() || best_distance > std::max<std::size_t>(1, (longer + 2) / 4) || 2 * best_distance >= shorter)
    return "";
  return fmt::format(" (did you mean \"{}\"?)", best);
}

std::string describe(const Json& value) {
  if (value.is_object()) return "an object";
  if (value.is_array()) return "an array";
  if (const auto literal = nonFiniteLiteral(value)) return *literal;
  std::string text = value.dump(-1, ' ', false, Json::error_handler_t::replace);
  if (text.size() > 60) text = text.substr(0, 57) + "...";
  return text;
}

std::string joinNames(const std::vector<std::string>& names, const char* quote) {
  std::string out;
  for (const auto& n : names) {
    if (!out.empty()) out += ", ";
    out += quote;
    out += n;
    out += quote;
  }
  return out;
}

void rejectUnknownKeys(const Json& object, const std::string& file, const std::string& path,
                       const std::vector<std::string>& allowed) {
  for (const auto& item : object.items()) {
    if (std::find(allowed.begin(), allowed.end(), item.key()) != allowed.end()) continue;
    throw InputError(file, childPath(path, item.key()),
                     fmt::format("unknown key \"{}\"{}; allowed keys{}: {}", item.key(), didYouMean(item.key(), allowed),
                                 path.empty() ? "" : " in " + path, joinNames(allowed)));
  }
}

std::string numberText(double value) { return Json(value).dump(); }

}  // namespace moe::json_input
