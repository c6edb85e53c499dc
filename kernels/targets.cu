// Tanh training targets on the GPU; loaded by cp3d/targets.py through
// cp3d._cuda.get_kernel("targets.cu", name). The per-voxel work lives in
// targets.cuh so that tests/host/targets_host.cpp can check it on the CPU.
#include "common.cuh"
#include "targets.cuh"

// Pass 1: per-label (count, sum z, sum y, sum x) into `sums` (zeroed by the
// caller, (n_labels + 1) * 4 doubles). Coordinates are integers, so the double
// sums are exact and the atomic order does not change the result.
extern "C" __global__ void cp3d_tanh_accumulate(const unsigned int* labels,
                                                cp3d_index ny, cp3d_index nx, cp3d_index n_vox,
                                                double* sums)
{
    cp3d_index stride = (cp3d_index)blockDim.x * gridDim.x;
    for (cp3d_index i = (cp3d_index)blockIdx.x * blockDim.x + threadIdx.x; i < n_vox; i += stride) {
        unsigned int l;
        double terms[4];
        if (cp3d_tanh_sum_terms(labels, i, ny, nx, &l, terms)) {
            double* s = sums + 4 * (cp3d_index)l;
            for (int k = 0; k < 4; ++k) {
                atomicAdd(s + k, terms[k]);
            }
        }
    }
}

// Pass 2: the flows of every voxel, (3, Z, Y, X) float32.
extern "C" __global__ void cp3d_tanh_write(const unsigned int* labels, const double* sums,
                                           cp3d_index ny, cp3d_index nx, cp3d_index n_vox,
                                           float inv_sz, float inv_sy, float inv_sx, float* flows)
{
    cp3d_index stride = (cp3d_index)blockDim.x * gridDim.x;
    for (cp3d_index i = (cp3d_index)blockIdx.x * blockDim.x + threadIdx.x; i < n_vox; i += stride) {
        cp3d_tanh_flows_at(labels, sums, i, ny, nx, n_vox, inv_sz, inv_sy, inv_sx, flows);
    }
}
