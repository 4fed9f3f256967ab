// A minimal Python extension module: importing umm_ops._C loads this shared library, whose static
// initialisers register the umm_ops torch ops (TORCH_LIBRARY).  No pybind11, no libtorch_python.
#include <Python.h>

static struct PyModuleDef umm_ops_c_module = {PyModuleDef_HEAD_INIT, "_C",
                                              "umm_ops compiled kernels (registered as torch.ops.umm_ops.*)", -1,
                                              nullptr};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&umm_ops_c_module); }
