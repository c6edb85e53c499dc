// Shared by every cp3d kernel. Per-voxel bodies are CP3D_HD functions so that
// CMake also compiles them as plain host C++ (tests/host/) and the test suite
// can hold them to the NumPy reference on machines without a GPU.
#pragma once

#if defined(__CUDACC__)
#define CP3D_HD __host__ __device__ __forceinline__
#else
#include <cmath>
#include <cstdint>
#define CP3D_HD inline
#endif

typedef long long cp3d_index;
