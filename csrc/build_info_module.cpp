// eft_fast._build_info: the build description, in a module that does not link libtorch.
// eft_fast/_extension.py reads it before loading eft_fast._C, so a torch mismatch is
// reported as a clear ImportError instead of a failed symbol lookup or a crash.
#include <Python.h>

#include "build_info.h"

static struct PyModuleDef build_info_module = {PyModuleDef_HEAD_INIT, "_build_info",
                                               "Build description of eft_fast._C", -1, nullptr};

PyMODINIT_FUNC PyInit__build_info(void) {
  PyObject* module = PyModule_Create(&build_info_module);
  if (module == nullptr) return nullptr;
  if (PyModule_AddStringConstant(module, "JSON", EFT_FAST_BUILD_INFO_JSON) < 0) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
