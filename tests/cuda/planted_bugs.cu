// Kernels with a planted bug each, and their fixed versions, for tests/test_cuda.py: the CPU
// simulation (cuda_sim.h) built with a sanitizer must report the bug and stay quiet on the fix.
// usage: planted_bugs oob|race|deadlock bug|fixed
#include <stdio.h>
#include <string.h>

#include "../../cuda_sim.h"

#define THREADS 64 // one block of two warps

// Each thread reads its right neighbour's input: the bug lets the last thread read one past the end.
__global__ void shift_left(float *out, const float *in, int n, int bug) {
    int i = threadIdx.x, from = bug || i + 1 < n ? i + 1 : i;
    out[i] = in[from];
}

// Each thread writes its slot of shared memory and reads its neighbour's: the bug leaves out the
// barrier between the write and the read.
__global__ void rotate_shared(float *out, const float *in, int bug) {
    __shared__ float slots[THREADS];
    slots[threadIdx.x] = in[threadIdx.x] * 2;
    if (!bug) __syncthreads();
    out[threadIdx.x] = slots[(threadIdx.x + 1) % THREADS];
}

// The bug: only the first warp reaches the barrier (a GPU hangs there).
__global__ void divergent_barrier(float *out, int bug) {
    if (!bug || threadIdx.x < 32) __syncthreads();
    out[threadIdx.x] = 1;
}

int main(int argc, char **argv) {
    if (argc != 3) return 2;
    int bug = !strcmp(argv[2], "bug");
    float *in, *out;
    cudaMalloc(&in, THREADS * sizeof(float));
    cudaMalloc(&out, THREADS * sizeof(float));
    for (int i = 0; i < THREADS; i++) in[i] = (float)i;
    if (!strcmp(argv[1], "oob")) sim::launch(1, THREADS, [=] { shift_left(out, in, THREADS, bug); });
    else if (!strcmp(argv[1], "race")) sim::launch(1, THREADS, [=] { rotate_shared(out, in, bug); });
    else if (!strcmp(argv[1], "deadlock")) sim::launch(1, THREADS, [=] { divergent_barrier(out, bug); });
    else return 2;
    printf("%g\n", out[THREADS - 2]);
    cudaFree(in);
    cudaFree(out);
    return 0;
}
