// Host build of the flow-following body, for tests/test_follow.py.
#include <algorithm>
#include <cmath>

using std::fmaxf;
using std::fminf;
#include "follow.cuh"

extern "C" void cp3d_host_follow_flows(const float* flows, const long long* starts,
                                       long long n_points, long long nz, long long ny,
                                       long long nx, float step, int n_iter, float* out) {
  for (long long i = 0; i < n_points; ++i) {
    float p[3];
    cp3d_unravel(starts[i], ny, nx, p);
    cp3d_follow_point(p, flows, nz, ny, nx, step, n_iter);
    std::copy(p, p + 3, out + 3 * i);
  }
}
