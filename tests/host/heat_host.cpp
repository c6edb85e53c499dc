// Host build of the heat-diffusion kernels (kernels/heat.cu): the per-voxel
// bodies from kernels/heat.cuh in plain loops that mirror the three kernels,
// for tests/test_targets.py.
#include <cstdint>
#include <utility>
#include <vector>

#include "common.cuh"
#include "heat.cuh"

// nbr: (27, n) int32 table; sources: int64 indices into 0..n-1; out: (3, n) float32.
extern "C" void cp3d_host_heat_flows(const int* nbr, int64_t n, const int64_t* sources, int64_t n_sources,
                                     int n_iter, float* out)
{
    std::vector<double> temp((size_t)n + 1, 0.0), next((size_t)n + 1, 0.0);
    for (int t = 0; t < n_iter; ++t) {
        for (int64_t s = 0; s < n_sources; ++s) {  // mirrors cp3d_heat_add_sources
            temp[(size_t)sources[s]] += 1.0;
        }
        for (cp3d_index i = 0; i < n; ++i) {  // mirrors cp3d_heat_step
            next[(size_t)i] = cp3d_heat_mean(nbr, n, temp.data(), i);
        }
        std::swap(temp, next);
    }
    for (cp3d_index i = 0; i < n; ++i) {  // mirrors cp3d_heat_flows
        cp3d_heat_flow(nbr, n, temp.data(), i, out);
    }
}
