#include "app/tool_info.hpp"

#include <torch/torch.h>

namespace moe {

ToolInfo toolInfo() {
  ToolInfo t;
  t.version = MOE_VERSION;
  t.torch_version = TORCH_VERSION;
  t.features = {"emulated"};
#ifdef MOE_HAVE_GLOO
  t.features.push_back("gloo");
#endif
#ifdef MOE_HAVE_CUDA
  t.features.push_back("nccl");  // built; usable only where a GPU is present
#endif
  return t;
}

}  // namespace moe
