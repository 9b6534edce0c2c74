// Host shim: compile a CUDA kernel file as plain C++ (g++) and run its grid on the CPU.
//
// Every CUDA thread is a ucontext fiber with its own stack. A block's fibers run one at a time,
// round robin; a fiber runs until it finishes or reaches a warp primitive (__ballot_sync,
// __shfl_*_sync, __syncwarp), where it leaves its value in the warp's slot and yields until all
// 32 lanes of its warp have arrived. So warp-synchronous code runs unchanged and each lane sees
// exactly the values the other lanes had at that point, as on the GPU. Blocks run one after the
// other (kernels must not depend on block order, as on the GPU). If every unfinished fiber waits
// and none can go on (a lane skipped a ballot its warp reached: undefined on a GPU), the launch
// stops with an error instead of hanging. Supported: 1-D blocks of a multiple of 32 threads, 2-D
// grids, full-warp masks only. Float arithmetic is IEEE single, each op rounded (the library is
// built with -ffp-contract=off so nothing is fused); __fmaf_rn is the C library's fmaf, one
// rounding of the exact a * b + c, as the GPU's fma.rn.f32.
#pragma once

#include <ucontext.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <functional>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)

struct dim3 {
    unsigned x = 1, y = 1, z = 1;
};
using uint3 = dim3;

namespace shim {

struct Fiber {
    ucontext_t ctx;
    uint3 tid;
    bool done = false;
};

struct Warp {
    unsigned gen = 0;                     // completed exchange rounds
    unsigned arrived = 0;                 // lanes arrived in the current round
    unsigned long long vals[2][32] = {};  // [round parity][lane]; double-buffered
};

struct Launch {
    dim3 grid, block;
    uint3 block_idx;
    std::vector<Fiber> fibers;
    std::vector<Warp> warps;
    ucontext_t scheduler;
    Fiber* cur = nullptr;
    bool progress = false;
    char error[256] = {};
    std::function<void()> body;
};

inline Launch* L = nullptr;  // the launch in progress (the shim runs one at a time)
inline std::vector<char> stacks;  // fiber stacks, kept across launches (grown, never shrunk)
inline char last_error[256] = {};
constexpr size_t kStack = 64 * 1024;

inline void fail(const char* msg) {
    if (!L->error[0]) std::snprintf(L->error, sizeof L->error, "%s", msg);
}

// Back to the scheduler; the memory clobber makes the compiler reload every global after it.
inline void yield() {
    swapcontext(&L->cur->ctx, &L->scheduler);
    asm volatile("" ::: "memory");
}

// One round of a warp collective: lane deposits v, waits for its 31 peers, gets the round's values.
inline const unsigned long long* exchange(unsigned mask, unsigned long long v) {
    const unsigned lane = L->cur->tid.x & 31u;
    if (mask != 0xffffffffu) fail("host shim supports full-warp masks (0xffffffff) only");
    Warp& w = L->warps[L->cur->tid.x >> 5];
    const unsigned g = w.gen;
    w.vals[g & 1u][lane] = v;
    L->progress = true;
    if (++w.arrived == 32u) {
        w.arrived = 0;
        w.gen++;
    } else {
        while (w.gen == g && !L->error[0]) yield();
    }
    // Round g + 2 (which reuses this buffer) cannot start before this lane has arrived in g + 1.
    return w.vals[g & 1u];
}

inline void entry() {
    L->body();
    L->cur->done = true;
    L->progress = true;
    swapcontext(&L->cur->ctx, &L->scheduler);
}

inline void run_block() {
    const unsigned n = L->block.x;
    for (unsigned t = 0; t < n; t++) {
        Fiber& f = L->fibers[t];
        f.done = false;
        f.tid = uint3{t, 0, 0};
        getcontext(&f.ctx);
        f.ctx.uc_stack.ss_sp = stacks.data() + t * kStack;
        f.ctx.uc_stack.ss_size = kStack;
        f.ctx.uc_link = nullptr;
        makecontext(&f.ctx, entry, 0);
    }
    for (Warp& w : L->warps) w = Warp();
    for (unsigned left = n; left > 0 && !L->error[0];) {
        L->progress = false;
        for (Fiber& f : L->fibers) {
            if (f.done) continue;
            L->cur = &f;
            swapcontext(&L->scheduler, &f.ctx);
            if (f.done) left--;
            if (L->error[0]) return;
        }
        if (left > 0 && !L->progress)
            fail("deadlock: lanes of a warp wait in a warp primitive that other lanes never reach");
    }
}

// Run body (one kernel call) over the whole grid. Returns 0, or -1 with last_error set.
inline int launch(dim3 grid, dim3 block, std::function<void()> body) {
    Launch launch_state;
    L = &launch_state;
    L->grid = grid;
    L->block = block;
    L->body = std::move(body);
    last_error[0] = 0;
    if (block.x == 0 || block.x % 32 != 0 || block.x > 1024 || block.y != 1 || block.z != 1 ||
        grid.x == 0 || grid.y == 0 || grid.z != 1) {
        fail("host shim needs 1-D blocks of 32..1024 threads (a multiple of 32) and a 2-D grid");
    } else {
        L->fibers.resize(block.x);
        L->warps.resize(block.x / 32);
        if (stacks.size() < block.x * kStack) stacks.resize(block.x * kStack);
        for (unsigned by = 0; by < grid.y && !L->error[0]; by++)
            for (unsigned bx = 0; bx < grid.x && !L->error[0]; bx++) {
                L->block_idx = uint3{bx, by, 0};
                run_block();
            }
    }
    std::memcpy(last_error, L->error, sizeof last_error);
    L = nullptr;
    return last_error[0] ? -1 : 0;
}

}  // namespace shim

// ---- CUDA built-ins -------------------------------------------------------------------------
#define threadIdx (shim::L->cur->tid)
#define blockIdx (shim::L->block_idx)
#define blockDim (shim::L->block)
#define gridDim (shim::L->grid)

inline unsigned __ballot_sync(unsigned mask, int pred) {
    const unsigned long long* v = shim::exchange(mask, pred != 0);
    unsigned word = 0;
    for (unsigned l = 0; l < 32; l++) word |= (v[l] != 0 ? 1u : 0u) << l;
    return word;
}

template <typename T>
inline T shim_lane_value(const unsigned long long* v, unsigned src) {
    T out;
    std::memcpy(&out, &v[src], sizeof(T));
    return out;
}

template <typename T>
inline T __shfl_down_sync(unsigned mask, T var, unsigned delta) {
    static_assert(sizeof(T) <= 8, "shuffle of more than 8 bytes");
    unsigned long long raw = 0;
    std::memcpy(&raw, &var, sizeof(T));
    const unsigned long long* v = shim::exchange(mask, raw);
    const unsigned src = (threadIdx.x & 31u) + delta;
    return src < 32 ? shim_lane_value<T>(v, src) : var;  // out of range: own value, as CUDA
}

template <typename T>
inline T __shfl_xor_sync(unsigned mask, T var, unsigned lane_mask) {
    static_assert(sizeof(T) <= 8, "shuffle of more than 8 bytes");
    unsigned long long raw = 0;
    std::memcpy(&raw, &var, sizeof(T));
    const unsigned long long* v = shim::exchange(mask, raw);
    return shim_lane_value<T>(v, ((threadIdx.x & 31u) ^ lane_mask) & 31u);
}

inline void __syncwarp(unsigned mask = 0xffffffffu) { shim::exchange(mask, 0); }

inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }

// No other fiber runs between the read and the write: a plain add is atomic here.
inline unsigned long long atomicAdd(unsigned long long* p, unsigned long long v) {
    const unsigned long long old = *p;
    *p = old + v;
    return old;
}
inline unsigned atomicAdd(unsigned* p, unsigned v) {
    const unsigned old = *p;
    *p = old + v;
    return old;
}

inline float __uint_as_float(unsigned u) {
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}
inline unsigned __float_as_uint(float f) {
    unsigned u;
    std::memcpy(&u, &f, 4);
    return u;
}
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fmaf_rn(float a, float b, float c) { return std::fmaf(a, b, c); }
