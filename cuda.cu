/* cuda.cu: kvc's forward pass on a GPU, behind backend.h's seam. One file, read top to bottom:
   errors and launches; device helpers (reductions, int8, halves); the kernels (embedding, RMSNorm,
   activation quantization, matrix-vector and tiled matrix-matrix products in fp32 and Q8_0, RoPE,
   the KV cache's store / load / fill, attention with split positions and their merge, SwiGLU);
   then the backend (upload, the forward pass that strings the kernels together, cache access).

   nvcc builds it for the GPU (`make cuda`); the host C++ compiler builds the same file against
   cuda_sim.h, which runs every kernel on the CPU (`make cuda-sim`). Kernels are launched only
   through LAUNCH. The numerics follow run.c's: activations quantized per group as quantize_row
   does, int32 dot products per group scaled in fp32, RoPE's angles in double, the cache's bytes as
   store_row writes them, int8 queries for int8 keys. Sums run in other orders than run.c's, so
   results agree to float rounding, not bit for bit.

   Supported: f32 and Q8_0 weights (any group that is a multiple of 4), f32 / f16 / q8_0 caches
   without rotation, head_dim up to MAX_HEAD_DIM. Anything else is refused at open.
*/
#ifdef __CUDACC__
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#else
#include "cuda_sim.h"
#endif
#include <math.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <vector>

#include "backend.h"

#ifdef __CUDACC__
#define DEVICE_NAME "cuda"
#else
#define DEVICE_NAME "cuda-sim"
#endif

#define DEVICE_BATCH 64        // tokens one forward chunk runs (the scratch is sized for it)
#define WARP 32                // threads of a warp; a q8_0 cache block is one value a lane
#define FULL_MASK 0xFFFFFFFFu  // every lane of a warp takes part in its shuffles
#define ELEMENT_THREADS 256    // threads per block of the elementwise kernels
#define NORM_THREADS 128       // threads per block (one token's row) of RMSNorm
#define ROW_WARPS 4            // matrix-vector: rows (one warp each) per block
#define MATVEC_MAX_TOKENS 4    // chunks of up to this many tokens take the matrix-vector kernels (decode)
#define TILE 16                // tiled matmul: a block computes TILE rows x TILE tokens, TILE values deep a step
#define ATT_THREADS 64         // attention: threads per (head, token, split) block, one position each per chunk
#define MAX_HEAD_DIM 256       // head_dim the attention kernel holds per thread (MAX_HEAD_DIM / ATT_THREADS values)
#define ATT_SPLIT 128          // decode splits a head's positions into ranges of about this many, merged after
#define MAX_SPLITS 64          // at most this many ranges a head
#define F16_QUIET_NAN 0x7E00u  // the NaN run.c stores for a non-finite value (with its sign)

// ---------------------------------------------------------------------------------------------
// Errors and launches: every failure becomes one line in the caller's error buffer

// error = "<device>: " and the message.
static void set_error(char *error, const char *fmt, ...) {
    int prefix = snprintf(error, BACKEND_ERROR_BYTES, "%s: ", DEVICE_NAME);
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(error + prefix, BACKEND_ERROR_BYTES - prefix, fmt, ap);
    va_end(ap);
}

// A CUDA runtime call that returns from the calling function with -1 when it fails.
#define CUDA_TRY(call, error)                                                                    \
    do {                                                                                         \
        cudaError_t status_ = (call);                                                            \
        if (status_ != cudaSuccess) {                                                            \
            set_error(error, "%s (%s)", cudaGetErrorString(status_), #call);                     \
            return -1;                                                                           \
        }                                                                                        \
    } while (0)

// The one place kernels are launched. A launch error (bad configuration) is kept until the
// forward pass checks it (first_launch_error).
static thread_local cudaError_t launch_error = cudaSuccess; // each calling thread's own
static void note_launch(void) {
    cudaError_t e = cudaGetLastError();
    if (e != cudaSuccess && launch_error == cudaSuccess) launch_error = e;
}
#ifdef __CUDACC__
#define LAUNCH(kernel, grid, block, ...) (kernel<<<(grid), (block)>>>(__VA_ARGS__), note_launch())
#else
#define LAUNCH(kernel, grid, block, ...) (sim::launch((grid), (block), [=] { kernel(__VA_ARGS__); }), note_launch())
#endif

static int first_launch_error(char *error) {
    cudaError_t e = launch_error;
    launch_error = cudaSuccess;
    CUDA_TRY(e, error);
    CUDA_TRY(cudaDeviceSynchronize(), error);
    return 0;
}

static unsigned blocks_for(long long items, int per_block) { return (unsigned)((items + per_block - 1) / per_block); }

// ---------------------------------------------------------------------------------------------
// Device helpers

__device__ __forceinline__ float warp_sum(float v) {
    for (int offset = WARP / 2; offset > 0; offset >>= 1) v += __shfl_xor_sync(FULL_MASK, v, offset);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
    for (int offset = WARP / 2; offset > 0; offset >>= 1) v = fmaxf(v, __shfl_xor_sync(FULL_MASK, v, offset));
    return v;
}

// The sum (or max) of one value from every thread of the block, returned to all of them. Each
// warp reduces its own; every thread then adds the warps' results in the same order.
__device__ float block_reduce(float v, int is_max) {
    __shared__ float per_warp[32];
    int warps = (blockDim.x + WARP - 1) / WARP;
    v = is_max ? warp_max(v) : warp_sum(v);
    if (threadIdx.x % WARP == 0) per_warp[threadIdx.x / WARP] = v;
    __syncthreads();
    float total = per_warp[0];
    for (int w = 1; w < warps; w++) total = is_max ? fmaxf(total, per_warp[w]) : total + per_warp[w];
    __syncthreads(); // per_warp is free again for the next reduction
    return total;
}

// 4 int8 values as one int, byte i = value i (__dp4a's operand)
__device__ __forceinline__ int pack4(const int8_t *p) {
    return (int)((uint32_t)(uint8_t)p[0] | (uint32_t)(uint8_t)p[1] << 8 | (uint32_t)(uint8_t)p[2] << 16 |
                 (uint32_t)(uint8_t)p[3] << 24);
}

__device__ __forceinline__ float half_bits_to_float(uint16_t bits) { return __half2float(__ushort_as_half(bits)); }

// fp32 to IEEE half, nearest even: the hardware conversion; NaN as run.c stores it (0x7E00, signed)
__device__ __forceinline__ uint16_t float_to_half_bits(float x) {
    if (x != x) return (uint16_t)(F16_QUIET_NAN | (signbit(x) ? 0x8000u : 0u));
    return (uint16_t)__half_as_ushort(__float2half_rn(x));
}

// ---------------------------------------------------------------------------------------------
// Weights on the device

// One weight tensor: (layers, rows, cols) values, fp32 or int8 with a scale per group of a row.
struct Matrix {
    int type;              // BACKEND_WEIGHT_F32 or _Q8_0
    int rows, cols, group; // per layer; group: values per scale (q8_0)
    const float *f;        // (layers, rows, cols) f32
    const int8_t *q;       // (layers, rows, cols) q8_0
    const float *scale;    // (layers, rows, cols / group) q8_0
};

static Matrix layer_of(Matrix m, int layer) {
    size_t values = (size_t)layer * m.rows * m.cols;
    if (m.f) m.f += values;
    if (m.q) m.q += values, m.scale += values / m.group;
    return m;
}

// Row `row` of m, value i, as a float
__device__ __forceinline__ float weight_at(const Matrix &m, int row, int i) {
    size_t at = (size_t)row * m.cols + i;
    return m.type == BACKEND_WEIGHT_F32 ? m.f[at] : m.q[at] * m.scale[at / m.group];
}

// Activations quantized for a q8_0 matmul: int8 values, one scale per group of a row.
struct QuantizedRows {
    const int8_t *q;       // (tokens, cols)
    const float *scale;    // (tokens, cols / group)
};

// ---------------------------------------------------------------------------------------------
// Kernels: embedding, RMSNorm, quantization, SwiGLU

// x[t] = row tokens[t] of the embedding table (dequantized). Grid: a block per token.
__global__ void embed_kernel(float *x, Matrix table, const int *tokens, int dim) {
    int t = blockIdx.x;
    for (int i = threadIdx.x; i < dim; i += blockDim.x) x[(size_t)t * dim + i] = weight_at(table, tokens[t], i);
}

// out[t] = x[t] / sqrt(mean(x[t]^2) + eps) * weight. Grid: a block per token.
__global__ void rmsnorm_kernel(float *out, const float *x, const float *weight, int dim, float eps) {
    const float *row = x + (size_t)blockIdx.x * dim;
    float ss = 0;
    for (int i = threadIdx.x; i < dim; i += blockDim.x) ss += row[i] * row[i];
    ss = block_reduce(ss, 0) / dim;
    float scale = 1.0f / sqrtf(ss + eps);
    for (int i = threadIdx.x; i < dim; i += blockDim.x) out[(size_t)blockIdx.x * dim + i] = row[i] * scale * weight[i];
}

// Each group of `group` values of x (tokens, cols) as int8 with scale max|x| / 127, rounded to
// nearest even (an all-zero group: scale 0, values 0), as run.c's quantize_group. Grid: a warp per group.
__global__ void quantize_kernel(int8_t *q, float *scale, const float *x, int group) {
    size_t first = (size_t)blockIdx.x * group;
    float amax = 0;
    for (int j = threadIdx.x; j < group; j += WARP) amax = fmaxf(amax, fabsf(x[first + j]));
    float s = warp_max(amax) / 127.0f, inverse = s > 0 ? 1.0f / s : 0.0f;
    for (int j = threadIdx.x; j < group; j += WARP) q[first + j] = (int8_t)__float2int_rn(x[first + j] * inverse);
    if (threadIdx.x == 0) scale[blockIdx.x] = s;
}

// gate = silu(gate) * up, elementwise over n values.
__global__ void swiglu_kernel(float *gate, const float *up, long long n) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) gate[i] = gate[i] / (1.0f + expf(-gate[i])) * up[i];
}

// ---------------------------------------------------------------------------------------------
// Kernels: matrix products. out (tokens, rows) = x (tokens, cols) W^T, added to out when
// `accumulate` (the residual adds). Decode takes a warp per weight row; prefill, shared-memory tiles.

__device__ __forceinline__ void store_output(float *out, size_t at, float value, int accumulate) {
    out[at] = accumulate ? value + out[at] : value;
}

// A warp per row; its lanes split the row (fp32: every 32nd value; q8_0: every 32nd group, each
// group's int8 sum by __dp4a, scaled by the weight's and the activation's scales). Grid: rows / ROW_WARPS.
__global__ void matvec_kernel(float *out, Matrix w, const float *x, QuantizedRows xq, int n, int accumulate) {
    int row = blockIdx.x * ROW_WARPS + threadIdx.x / WARP, lane = threadIdx.x % WARP;
    if (row >= w.rows) return; // a whole warp leaves together
    int cols = w.cols;
    for (int t = 0; t < n; t++) {
        float sum = 0;
        if (w.type == BACKEND_WEIGHT_F32) {
            const float *wr = w.f + (size_t)row * cols, *xr = x + (size_t)t * cols;
            for (int i = lane; i < cols; i += WARP) sum += wr[i] * xr[i];
        } else {
            int groups = cols / w.group;
            const int8_t *wr = w.q + (size_t)row * cols, *xr = xq.q + (size_t)t * cols;
            for (int g = lane; g < groups; g += WARP) {
                int isum = 0;
                for (int j = g * w.group; j < (g + 1) * w.group; j += 4) isum = __dp4a(pack4(wr + j), pack4(xr + j), isum);
                sum += (float)isum * w.scale[(size_t)row * groups + g] * xq.scale[(size_t)t * groups + g];
            }
        }
        sum = warp_sum(sum);
        if (lane == 0) store_output(out, (size_t)t * w.rows + row, sum, accumulate);
    }
}

// fp32 tiles: thread (tx, ty) computes row blockIdx.x * TILE + tx for token blockIdx.y * TILE + ty.
// Each step loads TILE values of TILE rows and of TILE tokens into shared memory (coalesced along
// the row), then every thread takes its dot product over them.
__global__ void matmul_tiled_kernel(float *out, Matrix w, const float *x, int n, int accumulate) {
    __shared__ float w_tile[TILE][TILE + 1]; // + 1: no bank conflicts down a column
    __shared__ float x_tile[TILE][TILE + 1];
    int tx = threadIdx.x, ty = threadIdx.y, row0 = blockIdx.x * TILE, t0 = blockIdx.y * TILE, cols = w.cols;
    float sum = 0;
    for (int k0 = 0; k0 < cols; k0 += TILE) {
        int k = k0 + tx, r = row0 + ty, t = t0 + ty;
        w_tile[ty][tx] = r < w.rows && k < cols ? w.f[(size_t)r * cols + k] : 0.0f;
        x_tile[ty][tx] = t < n && k < cols ? x[(size_t)t * cols + k] : 0.0f;
        __syncthreads();
        for (int j = 0; j < TILE; j++) sum += w_tile[tx][j] * x_tile[ty][j];
        __syncthreads();
    }
    if (row0 + tx < w.rows && t0 + ty < n) store_output(out, (size_t)(t0 + ty) * w.rows + row0 + tx, sum, accumulate);
}

// q8_0 tiles: int8 weights and activations in shared memory, int32 sums by __dp4a, each group's sum
// scaled as it closes (a group is a multiple of 4 values, so a __dp4a never straddles two).
__global__ void matmul_tiled_q8_kernel(float *out, Matrix w, QuantizedRows xq, int n, int accumulate) {
    __shared__ int8_t w_tile[TILE][TILE];
    __shared__ int8_t x_tile[TILE][TILE];
    int tx = threadIdx.x, ty = threadIdx.y, row0 = blockIdx.x * TILE, t0 = blockIdx.y * TILE, cols = w.cols;
    int row = row0 + tx, t = t0 + ty, groups = cols / w.group;
    int live = row < w.rows && t < n; // padding threads still load tiles and meet the barriers
    float sum = 0;
    int isum = 0;
    for (int k0 = 0; k0 < cols; k0 += TILE) {
        int k = k0 + tx, r = row0 + ty, tt = t0 + ty;
        w_tile[ty][tx] = r < w.rows && k < cols ? w.q[(size_t)r * cols + k] : 0;
        x_tile[ty][tx] = tt < n && k < cols ? xq.q[(size_t)tt * cols + k] : 0;
        __syncthreads();
        for (int j = 0; j < TILE && k0 + j < cols; j += 4) {
            isum = __dp4a(pack4(&w_tile[tx][j]), pack4(&x_tile[ty][j]), isum);
            int end = k0 + j + 4; // values summed so far
            if (live && end % w.group == 0) {
                int g = end / w.group - 1;
                sum += (float)isum * w.scale[(size_t)row * groups + g] * xq.scale[(size_t)t * groups + g];
                isum = 0;
            }
        }
        __syncthreads();
    }
    if (live) store_output(out, (size_t)t * w.rows + row, sum, accumulate);
}

// ---------------------------------------------------------------------------------------------
// Kernels: RoPE

// Rotates pair (2j, 2j+1) of every head of x (n, heads * head_dim) by (pos + t) * theta^(-2j/head_dim),
// the angle and its cos/sin in double as run.c's rope_table computes them. A thread per pair.
__global__ void rope_kernel(float *x, int n, int heads, int head_dim, int pos, float theta) {
    int half = head_dim / 2;
    long long pair = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (pair >= (long long)n * heads * half) return;
    int j = (int)(pair % half), t = (int)(pair / ((long long)heads * half));
    double freq = pow((double)theta, -2.0 * j / head_dim), angle = (double)(pos + t) * freq;
    float c = (float)cos(angle), s = (float)sin(angle);
    float *p = x + 2 * pair;
    float a = p[0], b = p[1];
    p[0] = a * c - b * s;
    p[1] = a * s + b * c;
}

// ---------------------------------------------------------------------------------------------
// Kernels: the KV cache, stored as run.c stores it. A cache is (layers, kv_heads, context) rows of
// head_dim values: f32, f16 (IEEE half), or q8_0 blocks of BACKEND_CACHE_GROUP values (an fp16
// scale d, then int8 q, x = q d; a block with a NaN or Inf is all NaN: scale NaN, q 0).

struct Cache {
    int type_k, type_v;
    uint8_t *keys, *values;  // (layers, kv_heads, context, row bytes)
    size_t row_k, row_v;     // bytes of one head's row
    int kv_heads, context, head_dim;
};

static size_t cache_row_bytes(int type, int head_dim) {
    return type == BACKEND_CACHE_F32 ? 4 * (size_t)head_dim
         : type == BACKEND_CACHE_F16 ? 2 * (size_t)head_dim
                                     : (size_t)head_dim / BACKEND_CACHE_GROUP * (2 + BACKEND_CACHE_GROUP);
}

__device__ __forceinline__ uint8_t *cache_row(const Cache &c, int value, int layer, int head, int pos) {
    size_t row = ((size_t)layer * c.kv_heads + head) * c.context + pos;
    return value ? c.values + row * c.row_v : c.keys + row * c.row_k;
}

// Value i of a stored row as a float.
__device__ __forceinline__ float cache_value(int type, const uint8_t *row, int i) {
    if (type == BACKEND_CACHE_F32) return ((const float *)row)[i];
    if (type == BACKEND_CACHE_F16) return half_bits_to_float(((const uint16_t *)row)[i]);
    const uint8_t *block = row + (size_t)(i / BACKEND_CACHE_GROUP) * (2 + BACKEND_CACHE_GROUP);
    return (float)(int8_t)block[2 + i % BACKEND_CACHE_GROUP] * half_bits_to_float(block[0] | block[1] << 8);
}

// Stores x (head_dim values) as a row of `type`; called by every lane of one warp. A q8_0 block
// is one value a lane: the block's max |x| and whether any value is not finite by shuffles.
__device__ void store_cache_row(int type, uint8_t *row, const float *x, int head_dim) {
    int lane = threadIdx.x;
    if (type != BACKEND_CACHE_Q8_0) {
        for (int i = lane; i < head_dim; i += WARP) {
            if (type == BACKEND_CACHE_F32) ((float *)row)[i] = x[i];
            else ((uint16_t *)row)[i] = float_to_half_bits(x[i]);
        }
        return;
    }
    for (int b = 0; b < head_dim / BACKEND_CACHE_GROUP; b++) {
        uint8_t *block = row + (size_t)b * (2 + BACKEND_CACHE_GROUP);
        float v = x[b * BACKEND_CACHE_GROUP + lane];
        float broken = warp_max(isfinite(v) ? 0.0f : 1.0f), amax = warp_max(fabsf(v));
        uint16_t d16 = broken > 0 ? (uint16_t)F16_QUIET_NAN : float_to_half_bits(amax / 127.0f);
        float d = half_bits_to_float(d16), inverse = d > 0 ? 1.0f / d : 0.0f;
        float q = broken > 0 ? 0.0f : fminf(fmaxf(rintf(v * inverse), -127.0f), 127.0f);
        block[2 + lane] = (uint8_t)(int8_t)q;
        if (lane == 0) block[0] = (uint8_t)(d16 & 0xFF), block[1] = (uint8_t)(d16 >> 8);
    }
}

// Keys and values of n tokens (n, kv_heads * head_dim each) into positions pos.. of a layer.
// Grid: a warp per (token, kv head, keys or values).
__global__ void cache_store_kernel(Cache c, int layer, int pos, const float *k, const float *v) {
    int task = blockIdx.x, value = task % 2, head = task / 2 % c.kv_heads, t = task / (2 * c.kv_heads);
    const float *x = (value ? v : k) + ((size_t)t * c.kv_heads + head) * c.head_dim;
    store_cache_row(value ? c.type_v : c.type_k, cache_row(c, value, layer, head, pos + t), x, c.head_dim);
}

// Positions pos.. of a layer as float32 (n, kv_heads * head_dim) keys and values. A thread per value.
__global__ void cache_load_kernel(Cache c, int layer, int pos, int n, float *keys, float *values) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x, per_token = (long long)c.kv_heads * c.head_dim;
    if (i >= n * per_token) return;
    int t = (int)(i / per_token), head = (int)(i % per_token / c.head_dim), d = (int)(i % c.head_dim);
    keys[i] = cache_value(c.type_k, cache_row(c, 0, layer, head, pos + t), d);
    values[i] = cache_value(c.type_v, cache_row(c, 1, layer, head, pos + t), d);
}

// Every row of one side (keys or values) set to `fill` as run.c's fill_row stores it (q8_0: the
// scale fill, every q 1). A thread per row.
__global__ void cache_fill_kernel(uint8_t *rows, long long count, int type, size_t row_bytes, int head_dim, float fill) {
    long long r = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (r >= count) return;
    uint8_t *row = rows + (size_t)r * row_bytes;
    uint16_t h = float_to_half_bits(fill);
    for (int i = 0; i < head_dim; i++) {
        if (type == BACKEND_CACHE_F32) ((float *)row)[i] = fill;
        else if (type == BACKEND_CACHE_F16) ((uint16_t *)row)[i] = h;
    }
    if (type != BACKEND_CACHE_Q8_0) return;
    for (int b = 0; b < head_dim / BACKEND_CACHE_GROUP; b++) {
        uint8_t *block = row + (size_t)b * (2 + BACKEND_CACHE_GROUP);
        block[0] = (uint8_t)(h & 0xFF), block[1] = (uint8_t)(h >> 8);
        for (int j = 0; j < BACKEND_CACHE_GROUP; j++) block[2 + j] = 1;
    }
}

// ---------------------------------------------------------------------------------------------
// Kernels: attention

// What attention reads besides the cache.
struct AttentionArgs {
    const float *q;          // (n, n_heads * head_dim) queries, RoPE applied
    QuantizedRows q8;        // for q8_0 keys: the queries as int8 per BACKEND_CACHE_GROUP (run.c's cache_query)
    float *out;              // (n, n_heads * head_dim) when unsplit
    float *part_max, *part_sum; // (n, n_heads, splits) when split: each range's max score and sum of e^(s - max)
    float *part_out;         // (n, n_heads, splits, head_dim) each range's unnormalized output
    int n_heads, group, pos, splits, layer;
    float scale;             // 1 / sqrt(head_dim)
};

// Score of query head h of token t against the key at position i: dot product times scale; for
// q8_0 keys int8 dot products per block, scaled by the key's and the query's block scales.
__device__ float attention_score(const Cache &c, const AttentionArgs &a, int t, int h, int i) {
    const uint8_t *key = cache_row(c, 0, a.layer, h / a.group, i);
    int hd = c.head_dim;
    size_t at = ((size_t)t * a.n_heads + h) * hd;
    float sum = 0;
    if (c.type_k != BACKEND_CACHE_Q8_0) {
        for (int d = 0; d < hd; d++) sum += a.q[at + d] * cache_value(c.type_k, key, d);
        return sum * a.scale;
    }
    const int8_t *q = a.q8.q + at;
    const float *qs = a.q8.scale + at / BACKEND_CACHE_GROUP;
    for (int b = 0; b < hd / BACKEND_CACHE_GROUP; b++) {
        const uint8_t *block = key + (size_t)b * (2 + BACKEND_CACHE_GROUP);
        int isum = 0;
        for (int j = 0; j < BACKEND_CACHE_GROUP; j += 4)
            isum = __dp4a(pack4((const int8_t *)block + 2 + j), pack4(q + b * BACKEND_CACHE_GROUP + j), isum);
        sum += (float)isum * (half_bits_to_float(block[0] | block[1] << 8) * qs[b]);
    }
    return sum * a.scale;
}

// Causal attention of query head blockIdx.x of token blockIdx.y over range blockIdx.z of its
// positions (0..pos + t), ATT_THREADS positions a chunk with an online softmax: each chunk's scores
// (a thread a position), their max and the sum of their exponentials, then each thread's share of
// the output dimensions rescaled and added to. Positions past the range are never read.
__global__ void attention_kernel(Cache c, AttentionArgs a) {
    __shared__ float weights[ATT_THREADS];
    int h = blockIdx.x, t = blockIdx.y, split = blockIdx.z, hd = c.head_dim;
    int len = a.pos + t + 1, per = (len + a.splits - 1) / a.splits, lo = split * per, hi = lo + per < len ? lo + per : len;
    float max = -INFINITY, sum = 0, acc[MAX_HEAD_DIM / ATT_THREADS] = {0};
    for (int c0 = lo; c0 < hi; c0 += ATT_THREADS) { // the same trip count in every thread: barriers inside
        int i = c0 + threadIdx.x, count = hi - c0 < ATT_THREADS ? hi - c0 : ATT_THREADS;
        float score = i < hi ? attention_score(c, a, t, h, i) : -INFINITY;
        float new_max = fmaxf(max, block_reduce(score, 1)), rescale = expf(max - new_max);
        float e = i < hi ? expf(score - new_max) : 0.0f;
        weights[threadIdx.x] = e;
        sum = sum * rescale + block_reduce(e, 0); // its barriers also publish weights[]
        for (int k = 0; k * ATT_THREADS + (int)threadIdx.x < hd; k++) {
            int d = k * ATT_THREADS + threadIdx.x;
            float o = acc[k] * rescale;
            for (int j = 0; j < count; j++) o += weights[j] * cache_value(c.type_v, cache_row(c, 1, a.layer, h / a.group, c0 + j), d);
            acc[k] = o;
        }
        max = new_max;
        __syncthreads(); // weights[] is rewritten by the next chunk
    }
    size_t head = (size_t)t * a.n_heads + h;
    for (int k = 0; k * ATT_THREADS + (int)threadIdx.x < hd; k++) {
        int d = k * ATT_THREADS + threadIdx.x;
        if (a.splits == 1) a.out[head * hd + d] = acc[k] / sum;
        else a.part_out[(head * a.splits + split) * hd + d] = acc[k];
    }
    if (a.splits > 1 && threadIdx.x == 0) a.part_max[head * a.splits + split] = max, a.part_sum[head * a.splits + split] = sum;
}

// Merges the ranges of each (head blockIdx.x, token blockIdx.y), as flash-decoding does:
// out = sum over ranges of e^(max_r - max) out_r / sum of e^(max_r - max) sum_r (empty ranges skipped).
__global__ void attention_merge_kernel(AttentionArgs a, int hd) {
    size_t head = (size_t)blockIdx.y * a.n_heads + blockIdx.x;
    const float *m = a.part_max + head * a.splits, *s = a.part_sum + head * a.splits;
    float max = -INFINITY, total = 0;
    for (int r = 0; r < a.splits; r++) max = fmaxf(max, m[r]);
    for (int r = 0; r < a.splits; r++)
        if (s[r] > 0) total += expf(m[r] - max) * s[r];
    for (int d = threadIdx.x; d < hd; d += blockDim.x) {
        float o = 0;
        for (int r = 0; r < a.splits; r++)
            if (s[r] > 0) o += expf(m[r] - max) * a.part_out[(head * a.splits + r) * hd + d];
        a.out[head * hd + d] = o / total;
    }
}

// ---------------------------------------------------------------------------------------------
// The backend: a sequence's weights, cache and scratch on the device

struct Weights {
    Matrix tok_embeddings, wq, wk, wv, wo, w1, w2, w3, wcls;
    float *rms_att, *rms_ffn, *rms_final; // (layers, dim), (layers, dim), (dim)
};

struct Scratch {                 // DEVICE_BATCH tokens of activations
    int *tokens;                 // (batch)
    float *x;                    // (batch, dim) residual stream
    float *xn;                   // (batch, max(dim, q_dim, hidden)) a matmul's input (normalized)
    int8_t *xq;                  // (batch, that) its int8 form
    float *xs;                   // (batch, that / 4) and its scales (a group has at least 4 values)
    float *q, *att;              // (batch, q_dim) queries, attention output
    int8_t *qq;                  // (batch, q_dim) queries as int8 for q8_0 keys
    float *qs;                   // (batch, q_dim / BACKEND_CACHE_GROUP) their scales
    float *k, *v;                // (batch, kv_dim)
    float *hb, *hb2;             // (batch, hidden)
    float *part_max, *part_sum;  // (MATVEC_MAX_TOKENS, n_heads, MAX_SPLITS)
    float *part_out;             // (MATVEC_MAX_TOKENS, n_heads, MAX_SPLITS, head_dim)
    float *logits;               // (batch, vocab)
};

struct BackendSequence {
    int dim, hidden_dim, n_layers, n_heads, n_kv_heads, head_dim, vocab_size;
    float rope_theta, norm_eps;
    Weights w;
    Cache cache;
    Scratch s;
    std::vector<void *> allocations;  // everything cudaMalloc'd, freed together
    unsigned long long bytes[3];      // weights, cache, scratch
};

static int device_alloc(BackendSequence *s, void **p, size_t bytes, int kind, char *error) {
    CUDA_TRY(cudaMalloc(p, bytes ? bytes : 1), error);
    s->allocations.push_back(*p);
    s->bytes[kind] += bytes;
    return 0;
}

enum { BYTES_WEIGHTS = 0, BYTES_CACHE = 1, BYTES_SCRATCH = 2 };

static int upload(BackendSequence *s, void **dst, const void *src, size_t bytes, char *error) {
    if (device_alloc(s, dst, bytes, BYTES_WEIGHTS, error)) return -1;
    CUDA_TRY(cudaMemcpy(*dst, src, bytes, cudaMemcpyHostToDevice), error);
    return 0;
}

// A weight tensor uploaded (the classifier shares the embedding table's copy when it is the same tensor).
static int upload_matrix(BackendSequence *s, Matrix *out, const BackendMatrix *m, const char *name, char *error) {
    if (m->type != BACKEND_WEIGHT_F32 && m->type != BACKEND_WEIGHT_Q8_0) {
        set_error(error, "no %s weights on this device (%s): convert the model to f32 or q8_0", m->type_name, name);
        return -1;
    }
    if (m->type == BACKEND_WEIGHT_Q8_0 && (m->group_size % 4 || m->cols % m->group_size)) {
        set_error(error, "q8_0 groups of %d values (%s): the kernels take groups of a multiple of 4", m->group_size, name);
        return -1;
    }
    *out = Matrix{m->type, m->rows, m->cols, m->group_size, NULL, NULL, NULL};
    size_t values = (size_t)m->layers * m->rows * m->cols;
    if (m->type == BACKEND_WEIGHT_F32) return upload(s, (void **)&out->f, m->values, values * sizeof(float), error);
    return upload(s, (void **)&out->q, m->values, values, error) ||
           upload(s, (void **)&out->scale, m->scales, values / m->group_size * sizeof(float), error);
}

static int check_cache(const BackendCache *c, int head_dim, char *error) {
    const int types[2] = {c->type_k, c->type_v};
    const char *names[2] = {c->type_k_name, c->type_v_name};
    for (int i = 0; i < 2; i++)
        if (types[i] != BACKEND_CACHE_F32 && types[i] != BACKEND_CACHE_F16 && types[i] != BACKEND_CACHE_Q8_0) {
            set_error(error, "no %s KV cache on this device (f32, f16 or q8_0)", names[i]);
            return -1;
        }
    if (c->rotate || c->centered_keys) {
        set_error(error, "no rotated or centered KV cache on this device");
        return -1;
    }
    if (head_dim > MAX_HEAD_DIM) {
        set_error(error, "head_dim %d is more than the attention kernel's %d", head_dim, MAX_HEAD_DIM);
        return -1;
    }
    return 0;
}

static int alloc_scratch(BackendSequence *s, char *error) {
    size_t B = DEVICE_BATCH, qd = (size_t)s->n_heads * s->head_dim, kvd = (size_t)s->n_kv_heads * s->head_dim;
    size_t wide = s->dim > (int)qd ? (size_t)s->dim : qd, parts = (size_t)MATVEC_MAX_TOKENS * s->n_heads * MAX_SPLITS;
    if (wide < (size_t)s->hidden_dim) wide = s->hidden_dim;
    Scratch *sc = &s->s;
    struct { void **p; size_t bytes; } all[] = {
        {(void **)&sc->tokens, B * sizeof(int)},          {(void **)&sc->x, B * s->dim * sizeof(float)},
        {(void **)&sc->xn, B * wide * sizeof(float)},     {(void **)&sc->xq, B * wide},
        {(void **)&sc->xs, B * wide / 4 * sizeof(float)}, {(void **)&sc->q, B * qd * sizeof(float)},
        {(void **)&sc->att, B * qd * sizeof(float)},      {(void **)&sc->qq, B * qd},
        {(void **)&sc->qs, B * qd / BACKEND_CACHE_GROUP * sizeof(float) + sizeof(float)},
        {(void **)&sc->k, B * kvd * sizeof(float)},       {(void **)&sc->v, B * kvd * sizeof(float)},
        {(void **)&sc->hb, B * s->hidden_dim * sizeof(float)}, {(void **)&sc->hb2, B * s->hidden_dim * sizeof(float)},
        {(void **)&sc->part_max, parts * sizeof(float)},  {(void **)&sc->part_sum, parts * sizeof(float)},
        {(void **)&sc->part_out, parts * s->head_dim * sizeof(float)},
        {(void **)&sc->logits, B * s->vocab_size * sizeof(float)},
    };
    for (size_t i = 0; i < sizeof all / sizeof all[0]; i++)
        if (device_alloc(s, all[i].p, all[i].bytes, BYTES_SCRATCH, error)) return -1;
    return 0;
}

static void sequence_free(BackendSequence *s) {
    if (!s) return;
    for (void *p : s->allocations) cudaFree(p);
    delete s;
}

static BackendSequence *sequence_open(const BackendModel *m, const BackendCache *c, char *error) {
    int devices = 0;
    if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
        set_error(error, "no CUDA device found");
        return NULL;
    }
    if (check_cache(c, m->head_dim, error)) return NULL;
    BackendSequence *s = new BackendSequence();
    s->dim = m->dim, s->hidden_dim = m->hidden_dim, s->n_layers = m->n_layers, s->n_heads = m->n_heads;
    s->n_kv_heads = m->n_kv_heads, s->head_dim = m->head_dim, s->vocab_size = m->vocab_size;
    s->rope_theta = m->rope_theta, s->norm_eps = m->norm_eps;
    Weights *w = &s->w;
    size_t norms = (size_t)m->n_layers * m->dim * sizeof(float);
    int failed = upload_matrix(s, &w->tok_embeddings, &m->tok_embeddings, "tok_embeddings", error) ||
                 upload_matrix(s, &w->wq, &m->wq, "wq", error) || upload_matrix(s, &w->wk, &m->wk, "wk", error) ||
                 upload_matrix(s, &w->wv, &m->wv, "wv", error) || upload_matrix(s, &w->wo, &m->wo, "wo", error) ||
                 upload_matrix(s, &w->w1, &m->w1, "w1", error) || upload_matrix(s, &w->w2, &m->w2, "w2", error) ||
                 upload_matrix(s, &w->w3, &m->w3, "w3", error) ||
                 upload(s, (void **)&w->rms_att, m->rms_att, norms, error) ||
                 upload(s, (void **)&w->rms_ffn, m->rms_ffn, norms, error) ||
                 upload(s, (void **)&w->rms_final, m->rms_final, m->dim * sizeof(float), error);
    if (!failed && m->wcls.values == m->tok_embeddings.values) w->wcls = w->tok_embeddings;
    else if (!failed) failed = upload_matrix(s, &w->wcls, &m->wcls, "wcls", error);
    Cache *cache = &s->cache;
    *cache = Cache{c->type_k, c->type_v, NULL, NULL, cache_row_bytes(c->type_k, m->head_dim), cache_row_bytes(c->type_v, m->head_dim),
                   m->n_kv_heads, c->context, m->head_dim};
    size_t rows = (size_t)m->n_layers * m->n_kv_heads * c->context;
    failed = failed || device_alloc(s, (void **)&cache->keys, rows * cache->row_k, BYTES_CACHE, error) ||
             device_alloc(s, (void **)&cache->values, rows * cache->row_v, BYTES_CACHE, error) || alloc_scratch(s, error);
    if (!failed && (cudaMemset(cache->keys, 0, rows * cache->row_k) != cudaSuccess ||
                    cudaMemset(cache->values, 0, rows * cache->row_v) != cudaSuccess)) {
        set_error(error, "cannot clear the KV cache");
        failed = 1;
    }
    if (failed) {
        sequence_free(s);
        return NULL;
    }
    return s;
}

// ---------------------------------------------------------------------------------------------
// The forward pass: the kernels of one chunk of up to DEVICE_BATCH tokens

// out (n, w.rows) = x (n, w.cols) W^T (+ out): the int8 kernels take x quantized in W's groups.
static void matmul(BackendSequence *s, float *out, Matrix w, const float *x, int n, int accumulate) {
    QuantizedRows xq = {s->s.xq, s->s.xs};
    if (w.type == BACKEND_WEIGHT_Q8_0) LAUNCH(quantize_kernel, blocks_for((long long)n * w.cols, w.group), WARP, s->s.xq, s->s.xs, x, w.group);
    if (n <= MATVEC_MAX_TOKENS) LAUNCH(matvec_kernel, blocks_for(w.rows, ROW_WARPS), ROW_WARPS * WARP, out, w, x, xq, n, accumulate);
    else if (w.type == BACKEND_WEIGHT_F32) LAUNCH(matmul_tiled_kernel, dim3(blocks_for(w.rows, TILE), blocks_for(n, TILE)), dim3(TILE, TILE), out, w, x, n, accumulate);
    else LAUNCH(matmul_tiled_q8_kernel, dim3(blocks_for(w.rows, TILE), blocks_for(n, TILE)), dim3(TILE, TILE), out, w, xq, n, accumulate);
}

static void attention(BackendSequence *s, int layer, int n, int pos) {
    Scratch *sc = &s->s;
    int qd = s->n_heads * s->head_dim, len = pos + n;
    int splits = n <= MATVEC_MAX_TOKENS ? (len + ATT_SPLIT - 1) / ATT_SPLIT : 1;
    if (splits > MAX_SPLITS) splits = MAX_SPLITS;
    AttentionArgs a = {sc->q, {sc->qq, sc->qs}, sc->att, sc->part_max, sc->part_sum, sc->part_out,
                       s->n_heads, s->n_heads / s->n_kv_heads, pos, splits, layer, 1.0f / sqrtf((float)s->head_dim)};
    if (s->cache.type_k == BACKEND_CACHE_Q8_0)
        LAUNCH(quantize_kernel, blocks_for((long long)n * qd, BACKEND_CACHE_GROUP), WARP, sc->qq, sc->qs, sc->q, BACKEND_CACHE_GROUP);
    LAUNCH(attention_kernel, dim3(s->n_heads, n, splits), ATT_THREADS, s->cache, a);
    if (splits > 1) LAUNCH(attention_merge_kernel, dim3(s->n_heads, n), ATT_THREADS, a, s->head_dim);
}

static void layer_forward(BackendSequence *s, int l, int n, int pos) {
    Scratch *sc = &s->s;
    const Weights *w = &s->w;
    int dim = s->dim, hd = s->head_dim;
    LAUNCH(rmsnorm_kernel, n, NORM_THREADS, sc->xn, sc->x, w->rms_att + (size_t)l * dim, dim, s->norm_eps);
    matmul(s, sc->q, layer_of(w->wq, l), sc->xn, n, 0);
    matmul(s, sc->k, layer_of(w->wk, l), sc->xn, n, 0);
    matmul(s, sc->v, layer_of(w->wv, l), sc->xn, n, 0);
    LAUNCH(rope_kernel, blocks_for((long long)n * s->n_heads * hd / 2, ELEMENT_THREADS), ELEMENT_THREADS, sc->q, n, s->n_heads, hd, pos, s->rope_theta);
    LAUNCH(rope_kernel, blocks_for((long long)n * s->n_kv_heads * hd / 2, ELEMENT_THREADS), ELEMENT_THREADS, sc->k, n, s->n_kv_heads, hd, pos, s->rope_theta);
    LAUNCH(cache_store_kernel, n * s->n_kv_heads * 2, WARP, s->cache, l, pos, sc->k, sc->v);
    attention(s, l, n, pos);
    matmul(s, sc->x, layer_of(w->wo, l), sc->att, n, 1);
    LAUNCH(rmsnorm_kernel, n, NORM_THREADS, sc->xn, sc->x, w->rms_ffn + (size_t)l * dim, dim, s->norm_eps);
    matmul(s, sc->hb, layer_of(w->w1, l), sc->xn, n, 0);
    matmul(s, sc->hb2, layer_of(w->w3, l), sc->xn, n, 0);
    LAUNCH(swiglu_kernel, blocks_for((long long)n * s->hidden_dim, ELEMENT_THREADS), ELEMENT_THREADS, sc->hb, sc->hb2, (long long)n * s->hidden_dim);
    matmul(s, sc->x, layer_of(w->w2, l), sc->hb, n, 1);
}

// n <= DEVICE_BATCH tokens at pos..; logits of tokens first..n-1 into sc->logits.
static int forward_chunk(BackendSequence *s, const int *tokens, int n, int pos, int first, char *error) {
    Scratch *sc = &s->s;
    CUDA_TRY(cudaMemcpy(sc->tokens, tokens, n * sizeof(int), cudaMemcpyHostToDevice), error);
    LAUNCH(embed_kernel, n, ELEMENT_THREADS, sc->x, s->w.tok_embeddings, sc->tokens, s->dim);
    for (int l = 0; l < s->n_layers; l++) layer_forward(s, l, n, pos);
    LAUNCH(rmsnorm_kernel, n - first, NORM_THREADS, sc->xn, sc->x + (size_t)first * s->dim, s->w.rms_final, s->dim, s->norm_eps);
    matmul(s, sc->logits, s->w.wcls, sc->xn, n - first, 0);
    return first_launch_error(error);
}

static int sequence_forward(BackendSequence *s, const int *tokens, int n, int pos, float *all_logits, float *last, char *error) {
    size_t vocab_bytes = (size_t)s->vocab_size * sizeof(float);
    for (int done = 0; done < n;) {
        int chunk = n - done < DEVICE_BATCH ? n - done : DEVICE_BATCH, first = all_logits ? 0 : chunk - 1;
        if (forward_chunk(s, tokens + done, chunk, pos + done, first, error)) return -1;
        if (all_logits)
            CUDA_TRY(cudaMemcpy(all_logits + (size_t)done * s->vocab_size, s->s.logits, chunk * vocab_bytes, cudaMemcpyDeviceToHost), error);
        done += chunk;
        if (done == n)
            CUDA_TRY(cudaMemcpy(last, s->s.logits + (size_t)(chunk - 1 - first) * s->vocab_size, vocab_bytes, cudaMemcpyDeviceToHost), error);
    }
    return 0;
}

static int sequence_cache_read(BackendSequence *s, int layer, int pos, int n, float *keys, float *values, char *error) {
    size_t per_token = (size_t)s->n_kv_heads * s->head_dim;
    for (int done = 0; done < n;) { // through the scratch's hidden-state rows, DEVICE_BATCH positions at a time
        int chunk = n - done < DEVICE_BATCH ? n - done : DEVICE_BATCH;
        LAUNCH(cache_load_kernel, blocks_for((long long)chunk * per_token, ELEMENT_THREADS), ELEMENT_THREADS, s->cache, layer, pos + done, chunk,
               s->s.k, s->s.v);
        if (first_launch_error(error)) return -1;
        CUDA_TRY(cudaMemcpy(keys + done * per_token, s->s.k, chunk * per_token * sizeof(float), cudaMemcpyDeviceToHost), error);
        CUDA_TRY(cudaMemcpy(values + done * per_token, s->s.v, chunk * per_token * sizeof(float), cudaMemcpyDeviceToHost), error);
        done += chunk;
    }
    return 0;
}

static int sequence_cache_reset(BackendSequence *s, float fill, char *error) {
    const Cache *c = &s->cache;
    long long rows = (long long)s->n_layers * c->kv_heads * c->context;
    LAUNCH(cache_fill_kernel, blocks_for(rows, ELEMENT_THREADS), ELEMENT_THREADS, c->keys, rows, c->type_k, c->row_k, c->head_dim, fill);
    LAUNCH(cache_fill_kernel, blocks_for(rows, ELEMENT_THREADS), ELEMENT_THREADS, c->values, rows, c->type_v, c->row_v, c->head_dim, fill);
    return first_launch_error(error);
}

static void sequence_memory(const BackendSequence *s, unsigned long long out[3]) { memcpy(out, s->bytes, sizeof s->bytes); }

extern "C" const Backend kvc_cuda_backend = {
    DEVICE_NAME, sequence_open, sequence_forward, sequence_cache_read, sequence_cache_reset, sequence_memory, sequence_free,
};
