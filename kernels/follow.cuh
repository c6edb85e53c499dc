// Per-point body of flow following, shared by kernels/follow.cu and the host
// build in tests/host/. Arithmetic is float32 in the same order as the NumPy
// reference (compile with -fmad=false for bit-identical positions).
#pragma once
#include "common.cuh"

// Moves p (z, y, x) n_iter times against the flow found at floor(p):
// p = clip(p - step * flows[:, floor(p)], 0, shape - 1), all axes updated
// from the same old position. flows is (3, nz, ny, nx), C-contiguous.
CP3D_HD void cp3d_follow_point(float p[3], const float* flows, cp3d_index nz,
                               cp3d_index ny, cp3d_index nx, float step,
                               int n_iter) {
  const cp3d_index plane = nz * ny * nx;
  const float hi_z = (float)(nz - 1), hi_y = (float)(ny - 1), hi_x = (float)(nx - 1);
  for (int it = 0; it < n_iter; ++it) {
    // p is never negative, so truncation is floor.
    const cp3d_index v = ((cp3d_index)p[0] * ny + (cp3d_index)p[1]) * nx + (cp3d_index)p[2];
    const float dz = step * flows[v];
    const float dy = step * flows[plane + v];
    const float dx = step * flows[2 * plane + v];
    p[0] = fminf(fmaxf(p[0] - dz, 0.0f), hi_z);
    p[1] = fminf(fmaxf(p[1] - dy, 0.0f), hi_y);
    p[2] = fminf(fmaxf(p[2] - dx, 0.0f), hi_x);
  }
}

// Starting position of the voxel with C-order flat index `flat`.
CP3D_HD void cp3d_unravel(cp3d_index flat, cp3d_index ny, cp3d_index nx, float p[3]) {
  cp3d_index z, y, x;
  cp3d_unravel3(flat, ny, nx, &z, &y, &x);
  p[0] = (float)z;
  p[1] = (float)y;
  p[2] = (float)x;
}
