// OpenBLAS's own thread count (LibTorch's at::set_num_threads does not reach it). Looked up at run
// time, because the system BLAS may be another implementation: then nothing is changed and -1 is
// returned. Torch-free.
#pragma once

namespace moe {

// The current count, or -1 when the BLAS is not OpenBLAS.
int blasThreads();

// Sets the count to n; returns the previous count, or -1 (nothing changed) when not OpenBLAS.
int setBlasThreads(int n);

}  // namespace moe
