# Locate a usable CUDA toolkit for torch's CMake config.
#
# On some machines `nvcc` on PATH is a wrapper script (`exec /usr/local/cuda-X/bin/nvcc "$@"`), so
# CMake cannot derive the toolkit root from its location and torch's config then fails with
# "Could NOT find CUDA ... CUDA_INCLUDE_DIRS". We ask nvcc itself where it lives (`nvcc --dryrun` prints
# `#$ TOP=<root>`, e.g. `/usr/local/cuda-13.0/bin/..`) and hand that root to CMake.
#
# Sets PYAMALGAM_NVCC (the real compiler), CUDAToolkit_ROOT (FindCUDAToolkit) and
# CUDA_TOOLKIT_ROOT_DIR (the legacy FindCUDA that torch's config still calls, which would otherwise
# derive the root from the wrapper's location too), or leaves PYAMALGAM_NVCC empty.
function(pyamalgam_find_cuda_toolkit)
  set(PYAMALGAM_NVCC "" PARENT_SCOPE)
  if(DEFINED ENV{CUDAToolkit_ROOT} AND EXISTS "$ENV{CUDAToolkit_ROOT}/bin/nvcc")
    set(root "$ENV{CUDAToolkit_ROOT}")
  elseif(DEFINED ENV{CUDA_HOME} AND EXISTS "$ENV{CUDA_HOME}/bin/nvcc")
    set(root "$ENV{CUDA_HOME}")
  else()
    find_program(_nvcc nvcc)
    if(NOT _nvcc)
      return()
    endif()
    execute_process(COMMAND "${_nvcc}" --dryrun -E -x cu /dev/null
                    OUTPUT_VARIABLE out ERROR_VARIABLE err RESULT_VARIABLE rc)
    if(NOT rc EQUAL 0)
      return()
    endif()
    if("${out}${err}" MATCHES "#\\$ TOP=([^\r\n]+)")
      get_filename_component(root "${CMAKE_MATCH_1}" ABSOLUTE)
    else()
      get_filename_component(root "${_nvcc}" DIRECTORY)
      get_filename_component(root "${root}/.." ABSOLUTE)
    endif()
  endif()
  if(NOT EXISTS "${root}/bin/nvcc" OR NOT EXISTS "${root}/include/cuda_runtime.h")
    message(STATUS "pyamalgam: nvcc found but no CUDA toolkit at '${root}'")
    return()
  endif()
  set(PYAMALGAM_NVCC "${root}/bin/nvcc" PARENT_SCOPE)
  set(CUDAToolkit_ROOT "${root}" PARENT_SCOPE)
  set(CUDA_TOOLKIT_ROOT_DIR "${root}" CACHE PATH "CUDA toolkit root (found by asking nvcc)")
endfunction()
