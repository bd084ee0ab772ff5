// Checkers of the reporters' output that share no code with the reporters: a mini JSON Schema
// validator (enough for the schema files in schema/) and a mini XML well-formedness checker.
#pragma once

#include <gtest/gtest.h>

#include <cctype>
#include <fstream>
#include <map>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

namespace moe::test {

using nlohmann::json;

inline json loadSchemaFile(const std::string& name) {
  const std::string path = std::string(MOE_SOURCE_DIR) + "/schema/" + name;
  std::ifstream in(path);
  EXPECT_TRUE(in.good()) << "cannot open " << path;
  return json::parse(in);
}

// ---------------------------------------------------------------- mini JSON Schema validator
// Supports what schema/report.schema.json uses: type (string or list), enum, required, properties,
// additionalProperties: false, items, and local "$ref": "#/...".

inline bool typeMatches(const json& value, const std::string& type) {
  if (type == "object") return value.is_object();
  if (type == "array") return value.is_array();
  if (type == "string") return value.is_string();
  if (type == "boolean") return value.is_boolean();
  if (type == "null") return value.is_null();
  if (type == "integer") return value.is_number_integer();
  if (type == "number") return value.is_number();
  ADD_FAILURE() << "schema uses an unsupported type " << type;
  return false;
}

inline void validateAgainst(const json& value, const json& schema_node, const json& root, const std::string& path,
                     std::vector<std::string>& errors) {
  const json* schema = &schema_node;
  while (schema->contains("$ref")) {
    const std::string ref = (*schema)["$ref"].get<std::string>();
    if (ref.rfind("#", 0) != 0) {
      errors.push_back(path + ": non-local $ref " + ref);
      return;
    }
    schema = &root.at(json::json_pointer(ref.substr(1)));
  }
  if (schema->contains("type")) {
    const json& type = (*schema)["type"];
    bool matched = false;
    if (type.is_string()) {
      matched = typeMatches(value, type.get<std::string>());
    } else {
      for (const json& t : type) matched = matched || typeMatches(value, t.get<std::string>());
    }
    if (!matched) {
      errors.push_back(path + ": type " + std::string(value.type_name()) + " is not " + type.dump());
      return;
    }
  }
  if (schema->contains("enum")) {
    bool found = false;
    for (const json& allowed : (*schema)["enum"]) found = found || allowed == value;
    if (!found) errors.push_back(path + ": " + value.dump() + " not in enum " + (*schema)["enum"].dump());
  }
  if (value.is_object()) {
    if (schema->contains("required")) {
      for (const json& key : (*schema)["required"]) {
        if (!value.contains(key.get<std::string>())) errors.push_back(path + ": missing required " + key.dump());
      }
    }
    const bool closed = schema->value("additionalProperties", true) == false;
    const json properties = schema->value("properties", json::object());
    for (const auto& [key, member] : value.items()) {
      if (properties.contains(key)) {
        validateAgainst(member, properties[key], root, path + "/" + key, errors);
      } else if (closed) {
        errors.push_back(path + ": key \"" + key + "\" is not in the schema");
      }
    }
  }
  if (value.is_array() && schema->contains("items")) {
    for (std::size_t i = 0; i < value.size(); ++i) {
      validateAgainst(value[i], (*schema)["items"], root, path + "/" + std::to_string(i), errors);
    }
  }
}

// Violations of schema/<schema_file> by `value`, one line each.
inline std::vector<std::string> schemaErrors(const json& value, const std::string& schema_file = "report.schema.json") {
  const json schema = loadSchemaFile(schema_file);
  std::vector<std::string> errors;
  validateAgainst(value, schema, schema, "", errors);
  return errors;
}

inline std::string joined(const std::vector<std::string>& lines) {
  std::string text;
  for (const std::string& line : lines) text += line + "\n";
  return text;
}

// ---------------------------------------------------------------- mini XML well-formedness checker
// Enough XML 1.0 to catch what a writer can get wrong: tag nesting, attribute quoting and
// uniqueness, raw '<' or '&' in text or attributes, unknown entities. Counts elements by name.

struct XmlCheck {
  bool ok = true;
  std::string error;
  std::map<std::string, int> element_counts;
  std::vector<std::map<std::string, std::string>> attributes_of;  // in document order
  std::vector<std::string> element_order;
  std::string text;  // all character data, unescaped, concatenated
};

inline std::string unescapeEntities(const std::string& raw, std::string& error) {
  std::string out;
  for (std::size_t i = 0; i < raw.size(); ++i) {
    if (raw[i] == '<') {
      error = "raw '<' in text or attribute";
      return out;
    }
    if (raw[i] != '&') {
      out += raw[i];
      continue;
    }
    const std::size_t semi = raw.find(';', i);
    if (semi == std::string::npos) {
      error = "unterminated entity";
      return out;
    }
    const std::string entity = raw.substr(i + 1, semi - i - 1);
    static const std::map<std::string, char> named = {
        {"amp", '&'}, {"lt", '<'}, {"gt", '>'}, {"quot", '"'}, {"apos", '\''}};
    if (named.count(entity)) {
      out += named.at(entity);
    } else if (entity.size() > 1 && entity[0] == '#' &&
               entity.find_first_not_of("0123456789", 1) == std::string::npos) {
      out += static_cast<char>(std::stoi(entity.substr(1)));
    } else {
      error = "unknown entity &" + entity + ";";
      return out;
    }
    i = semi;
  }
  return out;
}

inline XmlCheck checkXml(const std::string& doc) {
  XmlCheck result;
  auto fail = [&](const std::string& why, std::size_t at) {
    result.ok = false;
    result.error = why + " at offset " + std::to_string(at);
    return result;
  };
  std::vector<std::string> open;
  std::size_t i = 0;
  bool root_seen = false;
  if (doc.rfind("<?xml", 0) == 0) i = doc.find("?>") + 2;
  while (i < doc.size()) {
    if (doc[i] != '<') {
      const std::size_t next = doc.find('<', i);
      const std::string raw = doc.substr(i, next == std::string::npos ? std::string::npos : next - i);
      if (open.empty() && raw.find_first_not_of(" \t\r\n") != std::string::npos) {
        return fail("text outside the root element", i);
      }
      std::string error;
      result.text += unescapeEntities(raw, error);
      if (!error.empty()) return fail(error, i);
      if (next == std::string::npos) break;
      i = next;
      continue;
    }
    if (doc.compare(i, 2, "</") == 0) {
      const std::size_t end = doc.find('>', i);
      if (end == std::string::npos) return fail("unterminated end tag", i);
      const std::string name = doc.substr(i + 2, end - i - 2);
      if (open.empty() || open.back() != name) return fail("end tag </" + name + "> does not match", i);
      open.pop_back();
      i = end + 1;
      continue;
    }
    // Start tag: name, attributes, optional "/".
    std::size_t j = i + 1;
    while (j < doc.size() && (std::isalnum(static_cast<unsigned char>(doc[j])) || doc[j] == '-' ||
                              doc[j] == '_' || doc[j] == ':'))
      ++j;
    const std::string name = doc.substr(i + 1, j - i - 1);
    if (name.empty()) return fail("empty tag name", i);
    if (open.empty() && root_seen) return fail("second root element", i);
    root_seen = true;
    std::map<std::string, std::string> attributes;
    while (true) {
      while (j < doc.size() && std::isspace(static_cast<unsigned char>(doc[j]))) ++j;
      if (j >= doc.size()) return fail("unterminated start tag", i);
      if (doc[j] == '>' || doc.compare(j, 2, "/>") == 0) break;
      const std::size_t eq = doc.find('=', j);
      if (eq == std::string::npos || doc[eq + 1] != '"') return fail("attribute without quoted value", j);
      const std::string attribute = doc.substr(j, eq - j);
      const std::size_t close = doc.find('"', eq + 2);
      if (close == std::string::npos) return fail("unterminated attribute", j);
      std::string error;
      const std::string value = unescapeEntities(doc.substr(eq + 2, close - eq - 2), error);
      if (!error.empty()) return fail(error + " in attribute " + attribute, j);
      if (!attributes.emplace(attribute, value).second) return fail("duplicate attribute " + attribute, j);
      j = close + 1;
      if (j < doc.size() && !std::isspace(static_cast<unsigned char>(doc[j])) && doc[j] != '>' && doc[j] != '/') {
        return fail("no space between attributes", j);
      }
    }
    ++result.element_counts[name];
    result.attributes_of.push_back(attributes);
    result.element_order.push_back(name);
    if (doc[j] == '/') {
      i = j + 2;
    } else {
      open.push_back(name);
      i = j + 1;
    }
  }
  if (!open.empty()) return fail("unclosed element <" + open.back() + ">", doc.size());
  if (!root_seen) return fail("no root element", 0);
  return result;
}

inline const std::map<std::string, std::string>& firstAttributesOf(const XmlCheck& xml, const std::string& name) {
  for (std::size_t i = 0; i < xml.element_order.size(); ++i) {
    if (xml.element_order[i] == name) return xml.attributes_of[i];
  }
  static const std::map<std::string, std::string> none;
  ADD_FAILURE() << "no element " << name;
  return none;
}

}  // namespace moe::test
