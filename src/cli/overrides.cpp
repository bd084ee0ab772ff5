#include "cli/overrides.hpp"

#include <algorithm>
#include <sstream>

#include "common/errors.hpp"
#include "scenario/catalog.hpp"

namespace moe::cli {
namespace {

int parsePositive(const std::string& key, const std::string& text) {
  try {
    size_t used = 0;
    const long v = std::stol(text, &used);
    if (used == text.size() && v >= 1 && v <= (1 << 20)) return static_cast<int>(v);
  } catch (const std::exception&) {
  }
  throw UsageError("--mesh: " + key + "=" + text + ": expected a positive integer");
}

}  // namespace

void addOverrideOptions(CLI::App& sub, ScenarioOverrides& o) {
  sub.add_option("--mesh", o.mesh,
                 "Override the mesh, e.g. dp=4,pp=2,cp=1,mb=4 (also tp=, ep=, sp=on|off, vp=)");
  sub.add_option("--preset", o.preset, "Override framework.preset")->check(CLI::IsMember(presetNames()));
  sub.add_option("--fault", o.faults, "Add a named fault (repeatable)")->check(CLI::IsMember(faultNames()));
  sub.add_flag("--with-open-bugs", o.with_open_bugs,
               "Add the catalog faults the preset's framework still ships (framework.open_bugs)");
  sub.add_option("--dtype", o.dtype, "Override model.dtype of the mesh (the reference stays float64)")
      ->check(CLI::IsMember({"float64", "float32", "bfloat16"}));
}

void applyOverrides(Scenario& sc, const ScenarioOverrides& o) {
  if (!o.mesh.empty()) {
    std::stringstream in(o.mesh);
    std::string item;
    while (std::getline(in, item, ',')) {
      const auto eq = item.find('=');
      if (eq == std::string::npos)
        throw UsageError("--mesh: '" + item + "': expected key=value (dp, pp, cp, tp, ep, sp, mb, vp)");
      const std::string key = item.substr(0, eq), value = item.substr(eq + 1);
      if (key == "sp" || key == "sequence_parallel") {
        if (value == "on" || value == "true") sc.mesh.sequence_parallel = true;
        else if (value == "off" || value == "false") sc.mesh.sequence_parallel = false;
        else throw UsageError("--mesh: " + key + "=" + value + ": expected on or off");
        continue;
      }
      const int v = parsePositive(key, value);
      if (key == "dp") sc.mesh.dp = v;
      else if (key == "pp") sc.mesh.pp = v;
      else if (key == "cp") sc.mesh.cp = v;
      else if (key == "tp") sc.mesh.tp = v;
      else if (key == "ep") sc.mesh.ep = v;
      else if (key == "mb" || key == "microbatches") sc.mesh.microbatches = v;
      else if (key == "vp" || key == "virtual_stages") sc.mesh.virtual_stages = v;
      else throw UsageError("--mesh: unknown key '" + key + "' (expected dp, pp, cp, tp, ep, sp, mb, vp)");
    }
  }
  if (!o.preset.empty()) {
    const std::optional<Preset> preset = presetNamed(o.preset);
    if (!preset) throw UsageError("--preset: unknown preset '" + o.preset + "'");
    sc.framework.preset = *preset;
  }
  for (const auto& name : o.faults) {
    const std::optional<Fault> fault = faultNamed(name);
    if (!fault) throw UsageError("--fault: unknown fault '" + name + "'");
    if (std::find(sc.faults.begin(), sc.faults.end(), *fault) == sc.faults.end()) sc.faults.push_back(*fault);
  }
  if (!o.dtype.empty()) sc.model.dtype = parseDType(o.dtype);
  if (o.with_open_bugs) sc.framework.open_bugs = true;
  validateScenario(sc);
}

}  // namespace moe::cli
