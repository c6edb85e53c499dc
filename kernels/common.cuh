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

// C-order flat index -> (z, y, x).
CP3D_HD void cp3d_unravel3(cp3d_index i, cp3d_index ny, cp3d_index nx,
                           cp3d_index* z, cp3d_index* y, cp3d_index* x)
{
    *x = i % nx;
    cp3d_index rest = i / nx;
    *y = rest % ny;
    *z = rest / ny;
}
