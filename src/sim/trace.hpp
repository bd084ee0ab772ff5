// MOE_LBCHECK_DEBUG=1: one line per phase of a distributed rank on stderr (rank, seconds since the
// process started). Read once.
#pragma once

#include <string>

namespace moe {

void trace(int rank, const std::string& what);

}  // namespace moe
