// Fuzz target: the scenario parser and validator (parseScenarioText: JSON text in). Every input must
// give a valid scenario or an InputError; a valid scenario must also survive its own echo
// (scenarioToJsonText, as the report writes it) unchanged, since `selftest --export` and reports
// promise that the echoed text reads back to the same scenario.
#include <cstdint>
#include <string>

#include "fuzz_support.hpp"
#include "scenario/scenario.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const std::string text(reinterpret_cast<const char*>(data), size);
  moe::fuzz::acceptOnlyInputErrors("scenario", [&] {
    const moe::Scenario scenario = moe::parseScenarioText(text, "fuzz-scenario.json");
    const std::string echoed = moe::scenarioToJsonText(scenario);
    std::string echoed_again;
    try {
      echoed_again = moe::scenarioToJsonText(moe::parseScenarioText(echoed, "echo.json"));
    } catch (const moe::InputError& e) {
      moe::fuzz::contractBroken("scenario", std::string("the echo of a valid scenario is refused: ") + e.what());
    }
    if (echoed_again != echoed)
      moe::fuzz::contractBroken("scenario", "the echo reads back differently:\n" + echoed + "\n---\n" + echoed_again);
  });
  return 0;
}
