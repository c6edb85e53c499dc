// Per-voxel bodies of Cellpose's heat-diffusion flows (cp3d/targets.py,
// heat_flows): kernels/heat.cu runs them on the GPU, tests/host/heat_host.cpp
// on the CPU, both in the NumPy reference's order of operations.
//
// Layout:
//   nbr  : CP3D_NBR_T[27 * n], the 27 neighbours of each foreground voxel in C order of
//          the 3x3x3 offsets, row k at nbr + k * n; index n is a slot that stays
//          0 and stands for every neighbour outside the instance
//   temp : double[n + 1], the temperatures
//   out  : float[3 * n], the flows (z, y, x) of the foreground voxels
#pragma once

#include "common.cuh"

// The neighbour table's integer type: int, or long long past 2**31 - 1 voxels
// (cp3d/targets.py passes -DCP3D_NBR_T="long long" then).
#ifndef CP3D_NBR_T
#define CP3D_NBR_T int
#endif

// The mean of the 27 neighbours' temperatures, summed in slot order.
CP3D_HD double cp3d_heat_mean(const CP3D_NBR_T* nbr, cp3d_index n, const double* temp, cp3d_index i)
{
    double acc = temp[nbr[i]];
    for (int k = 1; k < 27; ++k) {
        acc += temp[nbr[(cp3d_index)k * n + i]];
    }
    return acc / 27.0;
}

// Minus the central-difference gradient, normalised: the flow away from the
// source. Slots (+1, -1) of z, y and x are (22, 4), (16, 10) and (14, 12).
CP3D_HD void cp3d_heat_flow(const CP3D_NBR_T* nbr, cp3d_index n, const double* temp, cp3d_index i, float* out)
{
    const int hi[3] = {22, 16, 14};
    const int lo[3] = {4, 10, 12};
    double down[3];
    for (int a = 0; a < 3; ++a) {
        down[a] = temp[nbr[(cp3d_index)lo[a] * n + i]] - temp[nbr[(cp3d_index)hi[a] * n + i]];
    }
    double norm = sqrt(down[0] * down[0] + down[1] * down[1] + down[2] * down[2]);
    for (int a = 0; a < 3; ++a) {
        out[(cp3d_index)a * n + i] = norm > 0 ? (float)(down[a] / norm) : 0.0f;
    }
}
