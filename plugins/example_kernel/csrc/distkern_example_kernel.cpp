// The plugin's torch library: every schema of namespace distkern_example_kernel (one place, like distkern.cpp), and
// the module stub that makes `import distkern_example_kernel._C` load this library and run the registrations.
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(distkern_example_kernel, m) {
  m.def("standardized_sqdist(Tensor x, Tensor mean, Tensor inv_std) -> Tensor");
}

// No Python API: the ops are reached as torch.ops.distkern_example_kernel.*.
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}
