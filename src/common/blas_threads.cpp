#include "common/blas_threads.hpp"

#include <dlfcn.h>

namespace moe {
namespace {

using Getter = int (*)();
using Setter = void (*)(int);

Getter getter() {
  static const auto get = reinterpret_cast<Getter>(dlsym(RTLD_DEFAULT, "openblas_get_num_threads"));
  return get;
}
Setter setter() {
  static const auto set = reinterpret_cast<Setter>(dlsym(RTLD_DEFAULT, "openblas_set_num_threads"));
  return set;
}

}  // namespace

int blasThreads() { return getter() != nullptr ? getter()() : -1; }

int setBlasThreads(int n) {
  if (getter() == nullptr || setter() == nullptr) return -1;
  const int previous = getter()();
  setter()(n);
  return previous;
}

}  // namespace moe
