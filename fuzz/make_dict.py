#!/usr/bin/env python3
"""Writes fuzz/moe.dict, the libFuzzer dictionary of the fuzz targets: every property name and string
enum of schema/*.json, every key of the capture manifest (the key lists of
src/capture/capture_manifest.cpp), the safetensors header keys and dtypes, and JSON tokens the parsers
treat specially. Usage: fuzz/make_dict.py (from anywhere; rewrites fuzz/moe.dict)."""
import glob
import json
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def schema_words():
    keys, enums = set(), set()

    def walk(node):
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "properties" and isinstance(value, dict):
                    keys.update(value.keys())
                if key == "enum" and isinstance(value, list):
                    enums.update(x for x in value if isinstance(x, str))
                if key == "const" and isinstance(value, str):
                    enums.add(value)
                walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    for path in sorted(glob.glob(os.path.join(ROOT, "schema", "*.json"))):
        with open(path) as f:
            walk(json.load(f))
    with open(os.path.join(ROOT, "src", "capture", "capture_manifest.cpp")) as f:
        source = f.read()
    for block in re.findall(r"const std::vector<std::string> k\w+Keys = \{([^}]*)\}", source):
        keys.update(re.findall(r'"([A-Za-z_]+)"', block))
    return keys, enums


def main():
    keys, enums = schema_words()
    lines = [
        "# Dictionary for the moe-lbcheck fuzz targets (libFuzzer -dict=), written by fuzz/make_dict.py:",
        "# every key of schema/*.json and of the capture manifest, the schemas' string enums, the",
        "# safetensors header keys and dtypes, and JSON tokens the parsers treat specially.",
    ]
    name = lambda s: re.sub(r"\W", "_", s)
    lines += ['key_%s="\\"%s\\""' % (name(k), k) for k in sorted(keys)]
    lines += ['enum_%s="\\"%s\\""' % (name(e), e) for e in sorted(enums) if re.fullmatch(r"[\w./-]+", e)]
    lines += ['st_%s="\\"%s\\""' % (k.strip("_"), k)
              for k in ["__metadata__", "moe_lbcheck_capture", "dtype", "shape", "data_offsets"]]
    lines += ['dtype_%s="\\"%s\\""' % (d, d)
              for d in ["F64", "F32", "F16", "BF16", "U8", "I8", "I16", "I32", "I64", "U16", "U32", "U64", "BOOL"]]
    tokens = ["NaN", "Infinity", "-Infinity", "1e400", "-0", "18446744073709551616", "9223372036854775807",
              "true", "false", "null", "{}", "[]", '\\"\\"', ":", ","]
    lines += ['tok_%d="%s"' % (i, t) for i, t in enumerate(tokens)]
    with open(os.path.join(ROOT, "fuzz", "moe.dict"), "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
