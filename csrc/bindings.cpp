// pyengine._C: loading it registers the torch ops (torch.ops.pyengine.*); this module
// itself exposes only non-tensor helpers. No torch header here: one pybind11 per TU.
#include <pybind11/pybind11.h>

#include "pyengine/core/version.h"

#ifndef PYENGINE_VERSION
#define PYENGINE_VERSION "0.0.0"
#endif

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "pyengine native extension (ops register as torch.ops.pyengine)";
#ifdef PYENGINE_WITH_CUDA
  m.attr("has_cuda") = true;
#else
  m.attr("has_cuda") = false;
#endif
  m.attr("core_abi_version") = pyengine::core::kCoreAbiVersion;
  m.def("build_info", [] {
    py::dict info;
    info["version"] = PYENGINE_VERSION;
    info["cxx_standard"] = __cplusplus;
    info["pybind11"] = std::to_string(PYBIND11_VERSION_MAJOR) + "." +
                       std::to_string(PYBIND11_VERSION_MINOR) + "." +
                       std::to_string(PYBIND11_VERSION_PATCH);
    info["compiler"] = __VERSION__;
#ifdef PYENGINE_WITH_CUDA
    info["cuda"] = true;
#else
    info["cuda"] = false;
#endif
    return info;
  }, "Build configuration of the native extension.");
}
