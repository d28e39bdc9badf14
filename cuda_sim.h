/* cuda_sim.h: just enough of CUDA for cuda.cu to compile with the host C++ compiler and run its
   kernels on the CPU (`make cuda-sim`). cuda.cu includes it instead of the CUDA runtime when not
   under nvcc.

   What it does:
   - device memory is host memory: cudaMalloc is malloc, cudaMemcpy is memcpy, cudaMemset is memset;
   - a kernel launch (sim_launch, which cuda.cu's LAUNCH macro calls) runs every block of the grid,
     one block after another, and every thread of a block as a thread of its own:
     * fibers (the default): each CUDA thread is a ucontext fiber with its own stack, all on the
       calling OS thread, switched round-robin; __syncthreads() and the warp barriers switch to the
       next fiber until every thread of the block (warp) has arrived. A block whose threads wait at
       a barrier that the others never reach is reported and aborts (a deadlock on a GPU);
     * real threads (CUDA_SIM_THREADS, the default under ASan and TSan): one OS thread per CUDA
       thread of a block, started per launch, each running every block in turn with a
       mutex/condition-variable barrier; so TSan sees races between threads of a block;
   - __shared__ variables are static: one copy that each block in turn uses (blocks never overlap);
   - warp shuffles (__shfl_xor_sync, the one cuda.cu uses) go through a per-warp exchange buffer
     between two warp barriers' worth of double buffering;
   - __half is a 16-bit IEEE half with round-to-nearest-even conversions; __dp4a is computed byte
     by byte; __float2int_rn rounds to nearest even;
   - threadIdx, blockIdx and blockDim read the running thread's own values.
   Nothing else of CUDA is here (no atomics, no __syncwarp, no gridDim): cuda.cu does not use them.

   What it does NOT model: memory coalescing, caches, bank conflicts and any timing; the cost of
   warp divergence (threads of a warp run independently here, so code that relies on implicit warp
   lockstep without a barrier or a shuffle is not caught); memory ordering and fences beyond what the
   barriers give (fibers are sequentially consistent; real threads get only the barriers' ordering); shuffle masks (every lane of a warp must take part, as full-mask code does); dynamic
   shared memory, streams, events, graphs, cooperative groups, texture memory; device limits (shared
   memory size, registers, the grid's dimensions); floating point of the GPU (fused multiply-adds
   and the fast-math intrinsics round differently: the host's libm and -ffp-contract decide here).
*/
#ifndef CUDA_SIM_H
#define CUDA_SIM_H

#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <ucontext.h>

#include <cmath>
#include <functional>
#include <vector>

#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
#define CUDA_SIM_THREADS 1 // sanitizers follow OS threads; they do not follow ucontext fibers
#endif

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static

// ---------------------------------------------------------------------------------------------
// Runtime: memory and errors

typedef int cudaError_t;
enum { cudaSuccess = 0, cudaErrorMemoryAllocation = 2 };
enum cudaMemcpyKind { cudaMemcpyHostToDevice, cudaMemcpyDeviceToHost, cudaMemcpyDeviceToDevice };

struct dim3 {
    unsigned x, y, z;
    dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

inline cudaError_t cudaMalloc(void **p, size_t bytes) {
    *p = malloc(bytes ? bytes : 1);
    return *p ? cudaSuccess : cudaErrorMemoryAllocation;
}
template <class T> inline cudaError_t cudaMalloc(T **p, size_t bytes) { return cudaMalloc((void **)p, bytes); }
inline cudaError_t cudaFree(void *p) { free(p); return cudaSuccess; }
inline cudaError_t cudaMemcpy(void *dst, const void *src, size_t bytes, cudaMemcpyKind) {
    memcpy(dst, src, bytes);
    return cudaSuccess;
}
inline cudaError_t cudaMemset(void *p, int value, size_t bytes) { memset(p, value, bytes); return cudaSuccess; }
inline cudaError_t cudaDeviceSynchronize(void) { return cudaSuccess; }
inline cudaError_t cudaGetLastError(void) { return cudaSuccess; }
inline cudaError_t cudaGetDeviceCount(int *n) { *n = 1; return cudaSuccess; }
inline const char *cudaGetErrorString(cudaError_t e) {
    return e == cudaSuccess ? "no error" : e == cudaErrorMemoryAllocation ? "out of memory" : "sim error";
}

// ---------------------------------------------------------------------------------------------
// Device arithmetic

struct __half { uint16_t bits; };

inline float __half2float(__half h) { // exact: every half is a float
    uint32_t sign = (uint32_t)(h.bits & 0x8000u) << 16, exp = (h.bits >> 10) & 0x1Fu, man = h.bits & 0x3FFu;
    float mag = exp == 0 ? ldexpf((float)man, -24) : exp == 31 ? (man ? NAN : INFINITY) : ldexpf((float)(man | 0x400u), (int)exp - 25);
    uint32_t u;
    memcpy(&u, &mag, 4);
    u |= sign;
    memcpy(&mag, &u, 4);
    return mag;
}

inline unsigned short __half_as_ushort(__half h) { return h.bits; }
inline __half __ushort_as_half(unsigned short bits) { return __half{bits}; }

// Rounds to the nearest half, ties to even; beyond the largest half: infinity. (NaN: a quiet NaN.)
inline __half __float2half_rn(float x) {
    uint32_t u;
    memcpy(&u, &x, 4);
    uint16_t sign = (uint16_t)((u >> 16) & 0x8000u);
    float a = fabsf(x);
    if (a != a) return __half{(uint16_t)(sign | 0x7FFFu)};
    if (a >= 65520.0f) return __half{(uint16_t)(sign | 0x7C00u)}; // rounds up past 65504
    int e;
    frexpf(a, &e); // a = f 2^e, f in [0.5, 1)
    int shift = e - 11 < -24 ? -24 : e - 11; // a half's step at this magnitude: 2^shift (subnormals: 2^-24)
    float steps = nearbyintf(ldexpf(a, -shift)); // exact: a has 24 bits, steps fewer
    uint32_t q = (uint32_t)steps;                // value = q 2^shift
    if (q == 0) return __half{sign};
    if (shift == -24 && q < 0x400u) return __half{(uint16_t)(sign | q)}; // subnormal
    if (q >= 0x800u) q >>= 1, shift++;                                   // rounded up into the next binade
    return __half{(uint16_t)(sign | (uint16_t)((shift + 25) << 10) | (uint16_t)(q & 0x3FFu))};
}

inline int __float2int_rn(float x) { return (int)nearbyintf(x); } // the default rounding: nearest even

// a.byte[i] * b.byte[i] summed over the 4 signed bytes, plus c
inline int __dp4a(int a, int b, int c) {
    for (int i = 0; i < 4; i++) c += (int8_t)(a >> (8 * i)) * (int8_t)(b >> (8 * i));
    return c;
}

// ---------------------------------------------------------------------------------------------
// Execution: threads of a block, barriers, launches

#define warpSize 32
#define SIM_MAX_BLOCK_THREADS 1024      // CUDA's limit on threads per block
#define SIM_FIBER_STACK (256 * 1024)    // bytes of stack each simulated thread gets

namespace sim {

struct Thread {      // what each simulated thread reads as its own
    dim3 thread, block;
    int shuffle_parity; // which half of its warp's exchange buffer the next shuffle uses
};

inline thread_local Thread *self; // the running simulated thread (a fiber's, or this OS thread's)
inline dim3 block_dim, grid_dim;  // the running launch's

// Counts arrivals; the last one of `count` releases the others.
struct Barrier {
    int count = 0, arrived = 0;
    unsigned generation = 0;
    pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
    pthread_cond_t released = PTHREAD_COND_INITIALIZER;
};

// A warp's barrier and the values its lanes exchange in shuffles (two halves, used in turn).
struct Warp {
    Barrier barrier;
    uint64_t exchange[2][warpSize];
};

inline Barrier block_barrier;
inline std::vector<Warp> warps;

inline unsigned thread_rank(void) { return self->thread.x + block_dim.x * (self->thread.y + block_dim.y * self->thread.z); }
inline unsigned block_threads(void) { return block_dim.x * block_dim.y * block_dim.z; }

#ifdef CUDA_SIM_THREADS

inline void barrier_wait(Barrier *b) {
    pthread_mutex_lock(&b->lock);
    unsigned generation = b->generation;
    if (++b->arrived == b->count) {
        b->arrived = 0;
        b->generation++;
        pthread_cond_broadcast(&b->released);
    } else {
        while (b->generation == generation) pthread_cond_wait(&b->released, &b->lock);
    }
    pthread_mutex_unlock(&b->lock);
}

// Every thread of the block is an OS thread that runs each block in turn (a barrier between blocks,
// so that the next block's use of the __shared__ variables waits for this one's).
inline void run_blocks(unsigned threads, unsigned blocks, const std::function<void()> &body) {
    std::vector<pthread_t> os(threads);
    std::vector<Thread> state(threads);
    struct Start { const std::function<void()> *body; Thread *state; unsigned blocks; };
    std::vector<Start> start(threads);
    for (unsigned i = 0; i < threads; i++) {
        state[i].thread = dim3(i % block_dim.x, i / block_dim.x % block_dim.y, i / (block_dim.x * block_dim.y));
        state[i].shuffle_parity = 0;
        start[i] = {&body, &state[i], blocks};
        auto main = [](void *arg) -> void * {
            Start *s = (Start *)arg;
            self = s->state;
            for (unsigned b = 0; b < s->blocks; b++) {
                self->block = dim3(b % grid_dim.x, b / grid_dim.x % grid_dim.y, b / (grid_dim.x * grid_dim.y));
                (*s->body)();
                barrier_wait(&block_barrier);
            }
            return nullptr;
        };
        if (pthread_create(&os[i], nullptr, main, &start[i])) {
            fprintf(stderr, "cuda_sim: cannot start thread %u of a block\n", i);
            abort();
        }
    }
    for (unsigned i = 0; i < threads; i++) pthread_join(os[i], nullptr);
}

#else

// Fibers: the scheduler (the launching OS thread) resumes each fiber of the block in turn; a fiber
// waiting at a barrier hands control back until the barrier's generation moves on. On x86-64 a
// switch saves the callee-saved registers on the old stack and pops them off the new one (a few
// nanoseconds; ucontext's swapcontext also makes a system call for the signal mask, ~20x slower).
#if defined(__x86_64__)
extern "C" void sim_switch_stack(void **save_sp, void *new_sp);
__asm__(".text\n.weak sim_switch_stack\n.type sim_switch_stack,@function\nsim_switch_stack:\n"
        "pushq %rbp\npushq %rbx\npushq %r12\npushq %r13\npushq %r14\npushq %r15\n"
        "movq %rsp, (%rdi)\nmovq %rsi, %rsp\n"
        "popq %r15\npopq %r14\npopq %r13\npopq %r12\npopq %rbx\npopq %rbp\nret\n");
#define SIM_FAST_SWITCH 1
#define SIM_SAVED_REGISTERS 6 // rbp, rbx, r12-r15
#endif

struct Fiber {
#ifdef SIM_FAST_SWITCH
    void *sp;
#else
    ucontext_t context;
#endif
    char *stack = nullptr;
    Thread state;
    bool done = false, waiting = false;
};

inline std::vector<Fiber> fibers;
inline Fiber *running;
inline long progress; // barriers released and fibers finished: a round without any is a deadlock
inline const std::function<void()> *fiber_body;
void fiber_main(void);

#ifdef SIM_FAST_SWITCH
inline void *scheduler_sp;
inline void switch_to(Fiber *f) { sim_switch_stack(&scheduler_sp, f->sp); }
inline void yield(void) { sim_switch_stack(&running->sp, scheduler_sp); }
[[noreturn]] inline void fiber_entry(void) {
    fiber_main();
    sim_switch_stack(&running->sp, scheduler_sp); // never resumed
    abort();
}
// A fresh stack whose first switch "returns" into fiber_entry, aligned as after a call.
inline void fiber_start(Fiber *f) {
    void **top = (void **)((uintptr_t)(f->stack + SIM_FIBER_STACK) & ~(uintptr_t)15);
    top[-1] = nullptr;                       // fiber_entry's own return address: it never returns
    top[-2] = (void *)fiber_entry;           // where the switch's ret goes
    f->sp = top - 2 - SIM_SAVED_REGISTERS;   // the registers it pops (any values)
}
#else
inline ucontext_t scheduler;
inline void switch_to(Fiber *f) { swapcontext(&scheduler, &f->context); }
inline void yield(void) { swapcontext(&running->context, &scheduler); }
inline void fiber_start(Fiber *f) {
    getcontext(&f->context);
    f->context.uc_stack.ss_sp = f->stack;
    f->context.uc_stack.ss_size = SIM_FIBER_STACK;
    f->context.uc_link = &scheduler;
    makecontext(&f->context, fiber_main, 0);
}
#endif

inline void barrier_wait(Barrier *b) {
    unsigned generation = b->generation;
    if (++b->arrived == b->count) {
        b->arrived = 0;
        b->generation++;
        progress++;
        return;
    }
    running->waiting = true;
    while (b->generation == generation) yield();
    running->waiting = false;
}

inline void fiber_main(void) {
    (*fiber_body)();
    running->done = true;
    progress++;
} // then back to the scheduler for good

inline void run_blocks(unsigned threads, unsigned blocks, const std::function<void()> &body) {
    if (fibers.size() < threads) fibers.resize(threads);
    fiber_body = &body;
    for (unsigned b = 0; b < blocks; b++) {
        dim3 block(b % grid_dim.x, b / grid_dim.x % grid_dim.y, b / (grid_dim.x * grid_dim.y));
        for (unsigned i = 0; i < threads; i++) {
            Fiber *f = &fibers[i];
            if (!f->stack && !(f->stack = (char *)malloc(SIM_FIBER_STACK))) {
                fprintf(stderr, "cuda_sim: out of memory for fiber stacks\n");
                abort();
            }
            fiber_start(f);
            f->state.thread = dim3(i % block_dim.x, i / block_dim.x % block_dim.y, i / (block_dim.x * block_dim.y));
            f->state.block = block;
            f->state.shuffle_parity = 0;
            f->done = f->waiting = false;
        }
        for (unsigned live = threads; live > 0;) {
            long before = progress;
            live = 0;
            for (unsigned i = 0; i < threads; i++) {
                Fiber *f = &fibers[i];
                if (f->done) continue;
                running = f;
                self = &f->state;
                switch_to(f);
                live += !f->done;
            }
            if (live && progress == before) {
                fprintf(stderr, "cuda_sim: deadlock in block %u: threads wait at a barrier the others never reach\n", b);
                abort();
            }
        }
    }
    self = nullptr;
}

#endif

inline pthread_mutex_t launch_lock = PTHREAD_MUTEX_INITIALIZER; // one launch at a time, whichever host thread

// Runs body as every thread of every block of a grid.
inline void launch(dim3 grid, dim3 block, const std::function<void()> &body) {
    pthread_mutex_lock(&launch_lock);
    block_dim = block;
    grid_dim = grid;
    unsigned threads = block_threads(), blocks = grid.x * grid.y * grid.z;
    if (threads == 0 || threads > SIM_MAX_BLOCK_THREADS) {
        fprintf(stderr, "cuda_sim: a block of %u threads (1..%d)\n", threads, SIM_MAX_BLOCK_THREADS);
        abort();
    }
    block_barrier.count = (int)threads;
    warps.assign((threads + warpSize - 1) / warpSize, Warp());
    for (unsigned w = 0; w < warps.size(); w++)
        warps[w].barrier.count = (int)(threads - w * warpSize < warpSize ? threads - w * warpSize : warpSize);
    if (blocks) run_blocks(threads, blocks, body);
    pthread_mutex_unlock(&launch_lock);
}

// A warp's shuffle: every lane puts its value in, waits for the whole warp, takes its source
// lane's. The two halves of the buffer alternate, so the next shuffle's writes cannot reach a
// half that a slow lane is still reading (it passes the next barrier only after every lane read).
template <class T> inline T shuffle(T value, int source) {
    static_assert(sizeof(T) <= sizeof(uint64_t), "shuffles move up to 8 bytes");
    unsigned rank = thread_rank();
    Warp *w = &warps[rank / warpSize];
    int lane = (int)(rank % warpSize), half = self->shuffle_parity;
    self->shuffle_parity ^= 1;
    memcpy(&w->exchange[half][lane], &value, sizeof(T));
    barrier_wait(&w->barrier);
    if (source < 0 || source >= w->barrier.count) source = lane; // past the warp: the lane keeps its own
    T out;
    memcpy(&out, &w->exchange[half][source], sizeof(T));
    return out;
}

} // namespace sim

#define threadIdx (sim::self->thread)
#define blockIdx (sim::self->block)
#define blockDim (sim::block_dim)

inline void __syncthreads(void) { sim::barrier_wait(&sim::block_barrier); }
template <class T> inline T __shfl_xor_sync(unsigned, T value, int lane_mask) {
    return sim::shuffle(value, (int)(sim::thread_rank() % warpSize) ^ lane_mask);
}

#endif
