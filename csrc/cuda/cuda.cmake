# Included from the top-level CMakeLists when a CUDA compiler is found.
set(CMAKE_CUDA_STANDARD 17)
set(CMAKE_CUDA_RUNTIME_LIBRARY Static)
pybind11_add_module(_cuda MODULE csrc/bindings/cuda_module.cpp csrc/cuda/spmm.cu)
target_include_directories(_cuda PRIVATE csrc/include)
set_target_properties(_cuda PROPERTIES CUDA_RUNTIME_LIBRARY Static)
install(TARGETS _cuda LIBRARY DESTINATION sparseprune)
string(REPLACE ";" " sm_" _archs "${CMAKE_CUDA_ARCHITECTURES}")
set(SP_CUDA_STATUS "built for sm_${_archs} (CUDA ${CMAKE_CUDA_COMPILER_VERSION})")
