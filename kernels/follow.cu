// Flow following on the GPU: one thread per foreground voxel.
#include "follow.cuh"

extern "C" __global__ void follow_flows(const float* __restrict__ flows,
                                        const long long* __restrict__ starts,
                                        long long n_points, long long nz,
                                        long long ny, long long nx, float step,
                                        int n_iter, float* __restrict__ out) {
  const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n_points) return;
  float p[3];
  cp3d_unravel(starts[i], ny, nx, p);
  cp3d_follow_point(p, flows, nz, ny, nx, step, n_iter);
  out[3 * i] = p[0];
  out[3 * i + 1] = p[1];
  out[3 * i + 2] = p[2];
}

// Advances positions (n_points, 3) in place by n_iter more steps: the host
// runs a long follow as slices of iterations so that Ctrl-C is seen between them.
extern "C" __global__ void follow_positions(const float* __restrict__ flows,
                                            long long n_points, long long nz,
                                            long long ny, long long nx, float step,
                                            int n_iter, float* __restrict__ positions) {
  const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n_points) return;
  float p[3] = {positions[3 * i], positions[3 * i + 1], positions[3 * i + 2]};
  cp3d_follow_point(p, flows, nz, ny, nx, step, n_iter);
  positions[3 * i] = p[0];
  positions[3 * i + 1] = p[1];
  positions[3 * i + 2] = p[2];
}
