// Precompiled header of the torch translation units (see CMakeLists.txt). Only headers that are
// expensive and stable belong here.
#pragma once
#include <torch/torch.h>
#include <nlohmann/json.hpp>
