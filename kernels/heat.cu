// Heat-diffusion flows on the GPU: two launches per diffusion step instead of
// one per neighbour; loaded by cp3d/targets.py through cp3d._cuda.get_kernel.
#include "common.cuh"
#include "heat.cuh"

// T[source] += 1 for every instance's source (one thread each; sources are distinct).
extern "C" __global__ void cp3d_heat_add_sources(const long long* sources, cp3d_index n_sources, double* temp)
{
    cp3d_index stride = (cp3d_index)blockDim.x * gridDim.x;
    for (cp3d_index s = (cp3d_index)blockIdx.x * blockDim.x + threadIdx.x; s < n_sources; s += stride) {
        temp[sources[s]] += 1.0;
    }
}

// One diffusion step into `next` (whose slot n the caller keeps at 0).
extern "C" __global__ void cp3d_heat_step(const CP3D_NBR_T* nbr, cp3d_index n, const double* temp, double* next)
{
    cp3d_index stride = (cp3d_index)blockDim.x * gridDim.x;
    for (cp3d_index i = (cp3d_index)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        next[i] = cp3d_heat_mean(nbr, n, temp, i);
    }
}

extern "C" __global__ void cp3d_heat_flows(const CP3D_NBR_T* nbr, cp3d_index n, const double* temp, float* out)
{
    cp3d_index stride = (cp3d_index)blockDim.x * gridDim.x;
    for (cp3d_index i = (cp3d_index)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        cp3d_heat_flow(nbr, n, temp, i, out);
    }
}
