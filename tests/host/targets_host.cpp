// Host build of the tanh-target kernels (kernels/targets.cu): the same
// per-voxel functions from kernels/targets.cuh, run in plain loops that mirror
// the two kernels, so tests/test_targets.py can hold them to the NumPy
// reference without a GPU.
#include <cstdint>
#include <vector>

#include "common.cuh"
#include "targets.cuh"

// compact_labels: C-order (nz, ny, nx) ids in 0..n_labels (0 = background).
// flows_out: C-order (3, nz, ny, nx) float32, fully overwritten.
extern "C" void cp3d_host_tanh_flows(const uint32_t* compact_labels, int64_t nz, int64_t ny,
                                     int64_t nx, int64_t n_labels, float scale_z, float scale_y,
                                     float scale_x, float* flows_out)
{
    const cp3d_index n_vox = (cp3d_index)(nz * ny * nx);
    std::vector<double> sums(4 * (size_t)(n_labels + 1), 0.0);
    // Mirrors cp3d_tanh_accumulate (serial adds in place of atomicAdd).
    for (cp3d_index i = 0; i < n_vox; ++i) {
        unsigned int l;
        double terms[4];
        if (cp3d_tanh_sum_terms(compact_labels, i, ny, nx, &l, terms)) {
            for (int k = 0; k < 4; ++k) {
                sums[4 * (size_t)l + k] += terms[k];
            }
        }
    }
    // Mirrors cp3d_tanh_write.
    const float inv_sz = 1.0f / scale_z, inv_sy = 1.0f / scale_y, inv_sx = 1.0f / scale_x;
    for (cp3d_index i = 0; i < n_vox; ++i) {
        cp3d_tanh_flows_at(compact_labels, sums.data(), i, ny, nx, n_vox, inv_sz, inv_sy, inv_sx,
                           flows_out);
    }
}
