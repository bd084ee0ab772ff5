// What this build is: version, LibTorch version, features (the backends it can run). Every report
// carries it.
#pragma once

#include "report/report.hpp"

namespace moe {

ToolInfo toolInfo();

}  // namespace moe
