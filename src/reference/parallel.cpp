#include "reference/parallel.hpp"

#include <dlfcn.h>

namespace moe::reference {
namespace {

// OpenBLAS's thread count, looked up at run time because the system BLAS may be another
// implementation (then nothing is changed).
using Getter = int (*)();
using Setter = void (*)(int);
Getter blasGetter() { return reinterpret_cast<Getter>(dlsym(RTLD_DEFAULT, "openblas_get_num_threads")); }
Setter blasSetter() { return reinterpret_cast<Setter>(dlsym(RTLD_DEFAULT, "openblas_set_num_threads")); }

}  // namespace

SingleThreadedBlas::SingleThreadedBlas() {
  static const Getter get = blasGetter();
  static const Setter set = blasSetter();
  if (get == nullptr || set == nullptr) return;
  previous_ = get();
  if (previous_ > 1) set(1);
}

SingleThreadedBlas::~SingleThreadedBlas() {
  static const Setter set = blasSetter();
  if (previous_ > 1 && set != nullptr) set(previous_);
}

}  // namespace moe::reference
