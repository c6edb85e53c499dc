// Host build of the filters' statistics (kernels/filters.cu): the per-voxel
// body from kernels/filters.cuh in plain loops that mirror the two kernels
// (centroid sums, then statistics), for tests/test_filters.py.
#include <cstdint>
#include <vector>

#include "common.cuh"
#include "filters.cuh"

// labels: C-order (nz, ny, nx) ids 0..n_labels; flows (3, nz, ny, nx); foreground 0/1 bytes.
// stats_out: (n_labels + 1) * 3 doubles, (count, in foreground, flow error sum) per id.
extern "C" void cp3d_host_tanh_statistics(const uint32_t* labels, const float* flows,
                                          const unsigned char* foreground, int64_t nz, int64_t ny,
                                          int64_t nx, int64_t n_labels, float scale_z, float scale_y,
                                          float scale_x, float sign, double* stats_out)
{
    const cp3d_index n_vox = (cp3d_index)(nz * ny * nx);
    std::vector<double> sums(4 * (size_t)(n_labels + 1), 0.0);
    for (cp3d_index i = 0; i < n_vox; ++i) {  // mirrors cp3d_tanh_accumulate
        unsigned int l;
        double terms[4];
        if (cp3d_tanh_sum_terms(labels, i, ny, nx, &l, terms)) {
            for (int k = 0; k < 4; ++k) {
                sums[4 * (size_t)l + k] += terms[k];
            }
        }
    }
    for (size_t k = 0; k < 3 * (size_t)(n_labels + 1); ++k) {
        stats_out[k] = 0.0;
    }
    const float inv_sz = 1.0f / scale_z, inv_sy = 1.0f / scale_y, inv_sx = 1.0f / scale_x;
    for (cp3d_index i = 0; i < n_vox; ++i) {  // mirrors cp3d_tanh_statistics
        unsigned int l;
        double terms[3];
        if (cp3d_tanh_statistics_terms(labels, flows, foreground, sums.data(), i, ny, nx, n_vox, inv_sz,
                                       inv_sy, inv_sx, sign, &l, terms)) {
            for (int k = 0; k < 3; ++k) {
                stats_out[3 * (size_t)l + k] += terms[k];
            }
        }
    }
}
