#include "common/json_input.hpp"

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <set>
#include <utility>

#include "common/errors.hpp"

namespace moe {
namespace {

using Json = nlohmann::json;

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
    for (std::string_view word :
         {std::string_view("-Infinity"), std::string_view("Infinity"), std::string_view("NaN")}) {
      if (startsWith(text, i, word)) {
        out += markerFor(word);
        i += word.size();
        goto next;
      }
    }
    if (c == '-' || (c >= '0' && c <= '9')) {
      const std::size_t start = i;
      while (i < text.size() && (std::string_view("0123456789+-.eE").find(text[i]) != std::string_view::npos))
        ++i;
      const std::string token(text.substr(start, i - start));
      errno = 0;
      const double value = std::strtod(token.c_str(), nullptr);
      if (errno == ERANGE && std::isinf(value)) {
        out += markerFor(token);
      } else {
        out += token;
      }
      continue;
    }
    out += c;
    ++i;
  next:;
  }
  return out;
}

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

// Tracks the parser's position as a JSON Pointer so that a repeated key is reported by path.
class DuplicateKeyGuard {
 public:
  explicit DuplicateKeyGuard(std::string file) : file_(std::move(file)) {}

  bool operator()(int /*depth*/, Json::parse_event_t event, Json& parsed) {
    switch (event) {
      case Json::parse_event_t::object_start:
        enterValue();
        frames_.push_back(Frame{false, {}, {}, 0});
        break;
      case Json::parse_event_t::array_start:
        enterValue();
        frames_.push_back(Frame{true, {}, {}, 0});
        break;
      case Json::parse_event_t::key: {
        Frame& frame = frames_.back();
        frame.current_key = parsed.get<std::string>();
        if (!frame.keys.insert(frame.current_key).second) {
          throw InputError(
              file_, currentPath(),
              "a key that occurs once in its object; \"" + frame.current_key + "\" appears twice");
        }
        break;
      }
      case Json::parse_event_t::value:
        enterValue();
        break;
      case Json::parse_event_t::object_end:
      case Json::parse_event_t::array_end:
        frames_.pop_back();
        break;
    }
    return true;
  }

 private:
  struct Frame {
    bool is_array;
    std::set<std::string> keys;
    std::string current_key;
    std::size_t next_index;
  };

  void enterValue() {
    if (!frames_.empty() && frames_.back().is_array) ++frames_.back().next_index;
  }

  std::string currentPath() const {
    std::string path;
    for (const Frame& f : frames_) {
      path += "/";
      path += f.is_array ? std::to_string(f.next_index - 1) : jsonPointerSegment(f.current_key);
    }
    return path;
  }

  std::string file_;
  std::vector<Frame> frames_;
};

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

Json parseJsonStrict(std::string_view text, const std::string& file, const std::string& document_pointer,
                     const std::string& what_document, bool mark_non_finite) {
  std::string marked;
  if (mark_non_finite) {
    marked = markNonFiniteNumbers(text);
    text = marked;
  }
  try {
    return Json::parse(text.begin(), text.end(), DuplicateKeyGuard(file), /*allow_exceptions=*/true,
                       /*ignore_comments=*/false);
  } catch (const Json::parse_error& e) {
    const auto [line, column] = lineAndColumn(text, e.byte > 0 ? e.byte - 1 : 0);
    std::string detail = e.what();
    const std::size_t at = detail.find("parse error");
    const std::size_t colon = at == std::string::npos ? std::string::npos : detail.find(": ", at);
    if (colon != std::string::npos) detail = detail.substr(colon + 2);
    throw InputError(file, document_pointer,
                     what_document + ", got invalid JSON at line " + std::to_string(line) + ", column " +
                         std::to_string(column) + ": " + detail);
  } catch (const Json::exception& e) {  // e.g. out_of_range.406: a number beyond the double range
    throw InputError(file, document_pointer, what_document + ", got JSON it cannot read: " + e.what());
  }
}

std::optional<std::string> nonFiniteLiteral(const Json& value) {
  if (!value.is_string()) return std::nullopt;
  const std::string& text = value.get_ref<const std::string&>();
  if (text.size() <= kNonFinitePrefix.size() ||
      std::string_view(text).substr(0, kNonFinitePrefix.size()) != kNonFinitePrefix)
    return std::nullopt;
  return text.substr(kNonFinitePrefix.size());
}

std::string describeJson(const Json& value) {
  if (value.is_object()) return "an object";
  if (value.is_array()) return "an array";
  if (const auto literal = nonFiniteLiteral(value)) return *literal;
  std::string text = value.dump(-1, ' ', false, Json::error_handler_t::replace);
  if (text.size() > 60) text = text.substr(0, 57) + "...";
  return text;
}

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
  if (best.empty() || best_distance > std::max<std::size_t>(1, (longer + 2) / 4) ||
      2 * best_distance >= shorter)
    return "";
  return " (did you mean \"" + best + "\"?)";
}

std::string joinNames(const std::vector<std::string>& names) {
  std::string out;
  for (const auto& n : names) {
    if (!out.empty()) out += ", ";
    out += n;
  }
  return out;
}

}  // namespace moe
