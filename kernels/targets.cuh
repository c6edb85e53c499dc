// Per-voxel bodies of the tanh training targets (cp3d/targets.py).
// Each function is CP3D_HD so that kernels/targets.cu runs it on the GPU and
// tests/host/targets_host.cpp runs the very same code on the CPU.
//
// Layout shared by both callers:
//   labels : compact ids, 0 = background and 1..n_labels the instances, C order (Z, Y, X)
//   sums   : double[(n_labels + 1) * 4], per id (count, sum z, sum y, sum x)
//   flows  : float[3 * Z * Y * X], components (z, y, x), C order (3, Z, Y, X)
#pragma once

#include "common.cuh"

// One axis of the tanh flow at coordinate `coord` of an instance whose
// centroid on that axis is `centroid`: tanh((coord - centroid) / scale).
// Positive away from the centre, bounded by 1 in magnitude.
CP3D_HD float cp3d_tanh_flow_voxel(cp3d_index coord, double centroid, float inv_scale)
{
    return tanhf((float)((double)coord - centroid) * inv_scale);
}

// The (count, z, y, x) contributions of voxel `i` to the sums of its label.
// Returns false for background, which contributes nothing.
CP3D_HD bool cp3d_tanh_sum_terms(const unsigned int* labels, cp3d_index i,
                                 cp3d_index ny, cp3d_index nx,
                                 unsigned int* label, double terms[4])
{
    unsigned int l = labels[i];
    if (l == 0) {
        return false;
    }
    cp3d_index z, y, x;
    cp3d_unravel3(i, ny, nx, &z, &y, &x);
    *label = l;
    terms[0] = 1.0;
    terms[1] = (double)z;
    terms[2] = (double)y;
    terms[3] = (double)x;
    return true;
}

// Write the three flow components of voxel `i` (zeros on background) from the
// accumulated per-label sums; `n_vox` = Z * Y * X is the stride between components.
CP3D_HD void cp3d_tanh_flows_at(const unsigned int* labels, const double* sums,
                                cp3d_index i, cp3d_index ny, cp3d_index nx, cp3d_index n_vox,
                                float inv_sz, float inv_sy, float inv_sx, float* flows)
{
    unsigned int l = labels[i];
    if (l == 0) {
        flows[i] = 0.0f;
        flows[n_vox + i] = 0.0f;
        flows[2 * n_vox + i] = 0.0f;
        return;
    }
    cp3d_index z, y, x;
    cp3d_unravel3(i, ny, nx, &z, &y, &x);
    const double* s = sums + 4 * (cp3d_index)l;
    double count = s[0];
    flows[i] = cp3d_tanh_flow_voxel(z, s[1] / count, inv_sz);
    flows[n_vox + i] = cp3d_tanh_flow_voxel(y, s[2] / count, inv_sy);
    flows[2 * n_vox + i] = cp3d_tanh_flow_voxel(x, s[3] / count, inv_sx);
}
