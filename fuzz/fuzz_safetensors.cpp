// Fuzz target: the safetensors reader (bytes in). The input is written to a file in this process's
// scratch directory and read both ways the tool reads data: SafetensorsView (mmap, header checked,
// no data read) and readSafetensorsFile (every tensor copied), then every float tensor converted as
// the problem loader does. A valid file or an InputError naming the file; nothing else.
#include <cstdint>
#include <string>

#include "data/safetensors.hpp"
#include "fuzz_support.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const std::string path = (moe::fuzz::scratchDirectory() / "input.safetensors").string();
  moe::fuzz::writeBytes(path, data, size);
  moe::fuzz::acceptOnlyInputErrors("safetensors", [&] {
    const moe::SafetensorsView view = moe::SafetensorsView::open(path);
    const moe::SafetensorsFile file = moe::readSafetensorsFile(path);
    if (file.tensors.size() != view.tensors().size())
      moe::fuzz::contractBroken("safetensors", "the view and the copying reader list different tensors");
    for (const moe::NamedTensor& tensor : file.tensors) {
      if (tensor.dtype == "F64" || tensor.dtype == "F32") (void)moe::tensorAsF64(tensor, path);
    }
  });
  return 0;
}
