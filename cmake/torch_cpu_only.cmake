# The CPU half of torch, for a CUDA build of torch on a machine without a CUDA toolkit.
#
# torch's own config (TorchConfig.cmake) stops with "Your installed Caffe2 version uses CUDA but I
# cannot find the CUDA libraries" there. The extension's CPU kernels need only the headers and
# libc10 / libtorch_cpu, so we define the two targets the rest of CMakeLists.txt links against.
execute_process(
  COMMAND "${Python_EXECUTABLE}" -c
    "import os, torch; print(os.path.dirname(torch.__file__)); print(int(torch._C._GLIBCXX_USE_CXX11_ABI))"
  OUTPUT_VARIABLE _out OUTPUT_STRIP_TRAILING_WHITESPACE)
string(REPLACE "\n" ";" _out "${_out}")
list(GET _out 0 _torch_root)
list(GET _out 1 _abi)
set(TORCH_INSTALL_PREFIX "${_torch_root}")
set(TORCH_INCLUDE_DIRS "${_torch_root}/include" "${_torch_root}/include/torch/csrc/api/include")
foreach(_name c10 torch_cpu)
  add_library(${_name} SHARED IMPORTED)
  set_target_properties(${_name} PROPERTIES
    IMPORTED_LOCATION "${_torch_root}/lib/lib${_name}.so"
    INTERFACE_INCLUDE_DIRECTORIES "${TORCH_INCLUDE_DIRS}"
    INTERFACE_COMPILE_DEFINITIONS "_GLIBCXX_USE_CXX11_ABI=${_abi}")
endforeach()
