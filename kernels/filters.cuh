// Per-voxel body of the filters' statistics (cp3d/filters.py): one pass over
// the volume adds each voxel's (count, in foreground, flow error) to its
// label's sums, recomputing the tanh target in place, so no flow-sized
// temporary is ever made. kernels/filters.cu runs it on the GPU with atomics,
// tests/host/filters_host.cpp on the CPU in a plain loop.
//
// Layout:
//   labels     : ids 0..n_labels, C order (Z, Y, X)
//   flows      : float[3 * Z * Y * X], components (z, y, x)
//   foreground : unsigned char[Z * Y * X], 0 or 1
//   sums       : double[(n_labels + 1) * 4] from cp3d_tanh_sum_terms: (count, sum z, sum y, sum x)
//   terms      : this voxel's (1, foreground, |flow error| summed over the three components)
#pragma once

#include "common.cuh"
#include "targets.cuh"

CP3D_HD bool cp3d_tanh_statistics_terms(const unsigned int* labels, const float* flows,
                                        const unsigned char* foreground, const double* sums,
                                        cp3d_index i, cp3d_index ny, cp3d_index nx, cp3d_index n_vox,
                                        float inv_sz, float inv_sy, float inv_sx, float sign,
                                        unsigned int* label, double terms[3])
{
    unsigned int l = labels[i];
    if (l == 0) {
        return false;
    }
    cp3d_index z, y, x;
    cp3d_unravel3(i, ny, nx, &z, &y, &x);
    const double* s = sums + 4 * (cp3d_index)l;
    double count = s[0];
    float e0 = fabsf(flows[i] - sign * cp3d_tanh_flow_voxel(z, s[1] / count, inv_sz));
    float e1 = fabsf(flows[n_vox + i] - sign * cp3d_tanh_flow_voxel(y, s[2] / count, inv_sy));
    float e2 = fabsf(flows[2 * n_vox + i] - sign * cp3d_tanh_flow_voxel(x, s[3] / count, inv_sx));
    *label = l;
    terms[0] = 1.0;
    terms[1] = foreground[i] ? 1.0 : 0.0;
    terms[2] = (double)e0 + (double)e1 + (double)e2;
    return true;
}
