// The filters' statistics on the GPU in one pass; loaded by cp3d/filters.py
// through cp3d._cuda.get_kernel("filters.cu", name). The centroids' sums come
// from cp3d_tanh_accumulate in targets.cu.
#include "common.cuh"
#include "filters.cuh"

// Per-label (count, in foreground, flow error sum) into `stats` (zeroed by the
// caller, (n_labels + 1) * 3 doubles). Counts are exact; the error sums are
// float terms added in double, so their order changes only the last bits.
extern "C" __global__ void cp3d_tanh_statistics(const unsigned int* labels, const float* flows,
                                                const unsigned char* foreground, const double* sums,
                                                cp3d_index ny, cp3d_index nx, cp3d_index n_vox,
                                                float inv_sz, float inv_sy, float inv_sx, float sign,
                                                double* stats)
{
    cp3d_index stride = (cp3d_index)blockDim.x * gridDim.x;
    for (cp3d_index i = (cp3d_index)blockIdx.x * blockDim.x + threadIdx.x; i < n_vox; i += stride) {
        unsigned int l;
        double terms[3];
        if (cp3d_tanh_statistics_terms(labels, flows, foreground, sums, i, ny, nx, n_vox, inv_sz, inv_sy,
                                       inv_sx, sign, &l, terms)) {
            double* out = stats + 3 * (cp3d_index)l;
            for (int k = 0; k < 3; ++k) {
                atomicAdd(out + k, terms[k]);
            }
        }
    }
}
