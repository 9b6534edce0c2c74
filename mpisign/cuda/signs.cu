// Packed sign votes on the GPU: pack, bit-sliced majority tally, apply, disagreement, and
// Lion's local step fused with its pack (lion_update_pack) and its decoupled-decay apply.
//
// Wire format (mpisign/backends/packing.py): coordinate i is bit i % 64 of uint64 word i / 64, bit 1 = "+".
// Read as uint32 on a little-endian machine, uint64 word k is uint32 words 2k (low) and 2k+1
// (high), so coordinate i is bit i % 32 of uint32 word i / 32: exactly one warp ballot in which
// lane l holds coordinate 32 * w + l. Buffers of n coordinates hold 2 * ceil(n / 64) uint32 words;
// every bit at or past n is written as 0.
//
// Rules kept for portability and for the host shim (mpisign/cuda/host_shim.h), which compiles
// this same file as C++ and runs it on the CPU:
//   * no #include: NVRTC (CuPy) has no system headers; fp16/bf16 are handled as raw bits;
//   * signs are read from the bits (no float compare), so FTZ/DAZ modes cannot change a vote;
//   * arithmetic uses __fadd_rn/__fmul_rn/__fsub_rn, which are never fused into FMA; where a
//     kernel must round as torch's own CUDA kernels do (Lion's), an FMA is an explicit __fmaf_rn,
//     chosen by an argument (the build has --fmad=false: nothing is contracted behind our back);
//   * every NaN apply writes is the canonical NaN of the output dtype (f32 0x7fffffff, f16 and
//     bf16 0x7fff), chosen here explicitly rather than left to the hardware or the conversions;
//   * warp primitives only in warp_ballot()/warp_sum(), reached by all 32 lanes of a warp
//     (loops around them have warp-uniform bounds); blockDim.x must be a multiple of 32.

#define FULL_MASK 0xffffffffu
#define MAX_PLANES 16  // bit-sliced counter planes: up to 65535 workers

typedef unsigned int u32;
typedef unsigned short u16;
typedef unsigned long long u64;

__device__ __forceinline__ u32 warp_ballot(u32 pred) { return __ballot_sync(FULL_MASK, pred); }

__device__ __forceinline__ u64 warp_sum(u64 x) {
    for (int d = 16; d > 0; d >>= 1) x += __shfl_down_sync(FULL_MASK, x, d);
    return x;  // complete in lane 0
}

__device__ __forceinline__ u64 global_thread() { return (u64)blockIdx.x * blockDim.x + threadIdx.x; }
__device__ __forceinline__ u64 grid_threads() { return (u64)gridDim.x * blockDim.x; }

// Valid-bit mask of uint32 word k of an n-bit vector (0 for padding words).
__device__ __forceinline__ u32 word_mask(u64 k, u64 n) {
    u64 start = k * 32;
    if (start >= n) return 0u;
    return (n - start >= 32) ? FULL_MASK : ((1u << (u32)(n - start)) - 1u);
}

// ---- the vote bit of one coordinate, from its raw bits --------------------------------------
// 1 for x > 0, 0 for x < 0, zero_bit for +-0 and NaN (inf counts as its sign).
template <typename T, T SIGN, T INF>
__device__ __forceinline__ u32 vote_bit(T b, u32 zero_bit) {
    T mag = (T)(b & (T)~SIGN);
    if (mag == 0 || mag > INF) return zero_bit;
    return (b & SIGN) ? 0u : 1u;
}

template <typename T, T SIGN, T INF>
__device__ __forceinline__ void pack_impl(const T* __restrict__ x, u64 n, int zero_bit,
                                          u32* __restrict__ out) {
    const u32 lane = threadIdx.x & 31u;
    const u64 nwords = 2 * ((n + 63) / 64);  // includes the high half of the last uint64 word
    const u64 stride = grid_threads() >> 5;
    for (u64 w = global_thread() >> 5; w < nwords; w += stride) {  // w is warp-uniform
        const u64 i = w * 32 + lane;  // coalesced: lane l reads element 32 w + l
        const u32 bit = (i < n) ? vote_bit<T, SIGN, INF>(x[i], (u32)zero_bit) : 0u;
        const u32 word = warp_ballot(bit);
        if (lane == 0) out[w] = word;
    }
}

extern "C" __global__ void pack_f32(const u32* __restrict__ x, u64 n, int zero_bit, u32* __restrict__ out) {
    pack_impl<u32, 0x80000000u, 0x7f800000u>(x, n, zero_bit, out);
}
extern "C" __global__ void pack_f16(const u16* __restrict__ x, u64 n, int zero_bit, u32* __restrict__ out) {
    pack_impl<u16, (u16)0x8000u, (u16)0x7c00u>(x, n, zero_bit, out);
}
extern "C" __global__ void pack_bf16(const u16* __restrict__ x, u64 n, int zero_bit, u32* __restrict__ out) {
    pack_impl<u16, (u16)0x8000u, (u16)0x7f80u>(x, n, zero_bit, out);
}

// ---- tally: M packed vectors (M x nwords uint32, row-major) -> packed plus and tie ----------
// One thread per uint32 word: the "+" count of its 32 coordinates lives in MAX_PLANES registers
// as a bit-sliced counter (plane j = bit j of the count); each worker is a carry-save add; the
// count is then compared with t = m / 2 plane by plane from the top: plus = count > t (i.e.
// count >= m/2 + 1), tie = count == t for even m (zeros for odd m).
extern "C" __global__ void tally_majority(const u32* __restrict__ votes, u32 m, u64 nwords, u64 n,
                                          u32* __restrict__ plus, u32* __restrict__ tie) {
    u32 planes = 0;
    while (planes < 32 && (m >> planes) != 0u) planes++;  // ceil(log2(m + 1))
    const u32 t = m >> 1;
    for (u64 k = global_thread(); k < nwords; k += grid_threads()) {
        u32 c[MAX_PLANES];
#pragma unroll
        for (int j = 0; j < MAX_PLANES; j++) c[j] = 0u;
        for (u32 r = 0; r < m; r++) {
            u32 carry = votes[(u64)r * nwords + k];  // coalesced along k for each worker r
#pragma unroll
            for (int j = 0; j < MAX_PLANES; j++) {
                if ((u32)j >= planes) break;
                const u32 next = c[j] & carry;
                c[j] ^= carry;
                carry = next;
            }
        }
        u32 gt = 0u, eq = FULL_MASK;
#pragma unroll
        for (int j = MAX_PLANES - 1; j >= 0; j--) {
            if ((u32)j >= planes) continue;
            if ((t >> j) & 1u) {
                eq &= c[j];
            } else {
                gt |= eq & c[j];
                eq &= ~c[j];
            }
        }
        const u32 valid = word_mask(k, n);
        plus[k] = gt & valid;
        tie[k] = (m & 1u) ? 0u : (eq & valid);
    }
}

// ---- apply: p = p - lr * (v + wd * p), v = +1 / -1 / 0 (tie), in fp32, rounded once per op --
__device__ __forceinline__ float bits_f32(u32 b) { return __uint_as_float(b); }

__device__ __forceinline__ float f16_to_f32(u16 h) {
    const u32 sign = ((u32)h & 0x8000u) << 16;
    u32 e = ((u32)h >> 10) & 0x1fu, man = (u32)h & 0x3ffu;
    if (e == 0x1fu) return bits_f32(sign | 0x7f800000u | (man << 13));  // inf, NaN
    if (e != 0u) return bits_f32(sign | ((e + 112u) << 23) | (man << 13));
    if (man == 0u) return bits_f32(sign);
    e = 113u;  // subnormal: normalize
    while ((man & 0x400u) == 0u) { man <<= 1; e--; }
    return bits_f32(sign | (e << 23) | ((man & 0x3ffu) << 13));
}

__device__ __forceinline__ u16 f32_to_f16_rn(float f) {  // round to nearest even, as cvt.rn
    const u32 x = __float_as_uint(f), sign = (x >> 16) & 0x8000u, ax = x & 0x7fffffffu;
    if (ax > 0x7f800000u) return (u16)(sign | 0x7e00u);   // NaN
    if (ax >= 0x477ff000u) return (u16)(sign | 0x7c00u);  // rounds past 65504: inf
    if (ax >= 0x38800000u) {                              // normal half
        const u32 r = ax - 0x38000000u;                   // rebias exponent 127 -> 15
        return (u16)(sign | ((r + 0xfffu + ((r >> 13) & 1u)) >> 13));
    }
    const u32 e = ax >> 23;
    if (e < 102u) return (u16)sign;  // below 2^-25: rounds to 0
    const u32 m = (ax & 0x7fffffu) | 0x800000u, s = 126u - e;  // half subnormal = m >> s
    const u32 rem = m & ((1u << s) - 1u), half = 1u << (s - 1u);
    u32 q = m >> s;
    if (rem > half || (rem == half && (q & 1u))) q++;
    return (u16)(sign | q);
}

__device__ __forceinline__ float bf16_to_f32(u16 h) { return bits_f32((u32)h << 16); }

__device__ __forceinline__ u16 f32_to_bf16_rn(float f) {
    const u32 x = __float_as_uint(f);
    if ((x & 0x7fffffffu) > 0x7f800000u) return (u16)(((x >> 16) & 0x8000u) | 0x7fc0u);  // NaN
    return (u16)((x + 0x7fffu + ((x >> 16) & 1u)) >> 16);
}

// The canonical NaN of each dtype: sign 0, exponent and mantissa all ones. NVIDIA GPUs' fp32
// arithmetic already returns it for every NaN result (one canonical NaN, 0x7fffffff, and no NaN
// payload in single precision: forums.developer.nvidia.com/t/68266 and /t/57047; the PTX ISA
// text itself was not at hand), while x86 keeps an input NaN's sign and payload and makes
// 0xffc00000 of inf - inf. apply writes it explicitly, so the rule does not rest on the
// hardware, on the host shim's CPU or on the float -> half conversions below.
struct F32 {
    typedef float T;
    __device__ static float load(float p) { return p; }
    __device__ static float store(float x) { return x; }
    __device__ static float nan() { return bits_f32(0x7fffffffu); }
};
struct F16 {
    typedef u16 T;
    __device__ static float load(u16 p) { return f16_to_f32(p); }
    __device__ static u16 store(float x) { return f32_to_f16_rn(x); }
    __device__ static u16 nan() { return (u16)0x7fffu; }
};
struct BF16 {
    typedef u16 T;
    __device__ static float load(u16 p) { return bf16_to_f32(p); }
    __device__ static u16 store(float x) { return f32_to_bf16_rn(x); }
    __device__ static u16 nan() { return (u16)0x7fffu; }
};

// The vote of coordinate i: +1, -1, or +0.0 at a tie.
__device__ __forceinline__ float vote_value(const u32* __restrict__ plus, const u32* __restrict__ tie,
                                            int has_tie, u64 i) {
    const u64 k = i >> 5;
    const u32 b = (u32)(i & 31u);
    if (has_tie && ((tie[k] >> b) & 1u)) return 0.0f;
    return ((plus[k] >> b) & 1u) ? 1.0f : -1.0f;
}

// NaN tested on the bits (exponent all ones, mantissa not 0): no float compare to fold.
__device__ __forceinline__ bool is_nan_f32(float x) {
    return (__float_as_uint(x) & 0x7fffffffu) > 0x7f800000u;
}

template <typename D>
__device__ __forceinline__ void apply_impl(typename D::T* __restrict__ p, const u32* __restrict__ plus,
                                           const u32* __restrict__ tie, int has_tie, u64 n,
                                           float lr, float wd) {
    for (u64 i = global_thread(); i < n; i += grid_threads()) {
        const float v = vote_value(plus, tie, has_tie, i);
        const float x = D::load(p[i]);
        // wd = 0 leaves wd * x out (0 * inf would turn an inf parameter into NaN); the CPU
        // path, mpisign.packing.apply_signs, rounds the same operations the same way.
        const float d = wd == 0.0f ? v : __fadd_rn(v, __fmul_rn(wd, x));
        const float r = __fsub_rn(x, __fmul_rn(lr, d));
        p[i] = is_nan_f32(r) ? D::nan() : D::store(r);
    }
}

#define APPLY_KERNEL(name, D)                                                                    \
    extern "C" __global__ void name(D::T* __restrict__ p, const u32* __restrict__ plus,           \
                                    const u32* __restrict__ tie, int has_tie, u64 n, float lr,    \
                                    float wd) {                                                   \
        apply_impl<D>(p, plus, tie, has_tie, n, lr, wd);                                          \
    }
APPLY_KERNEL(apply_f32, F32)
APPLY_KERNEL(apply_f16, F16)
APPLY_KERNEL(apply_bf16, BF16)

// ---- apply_decayed: p = p * decay - lr * v (decoupled weight decay: Lion's, AdamW's) ---------
// Rounded as torch's p.mul_(decay) then p.add_(v, alpha=-lr) round it on the GPU, each in fp32
// (torch's opmath for all three dtypes) with decay and lr rounded to fp32: the product is
// rounded to p's dtype before the add, as torch stores it in p between the two ops. -lr * v is
// exact (v = +1 / -1 / +0.0 at a tie), so whether torch's add is one FMA or two roundings
// cannot change a bit. Where torch rounds alpha to a half dtype instead (its CPU kernels do),
// the caller passes lr so rounded (mpisign/cuda/torch_check.py finds out which on the device).
// NaN as apply: the canonical NaN of the dtype.
template <typename D>
__device__ __forceinline__ void apply_decayed_impl(typename D::T* __restrict__ p,
                                                   const u32* __restrict__ plus,
                                                   const u32* __restrict__ tie, int has_tie, u64 n,
                                                   float lr, float decay) {
    const float neg_lr = -lr;
    for (u64 i = global_thread(); i < n; i += grid_threads()) {
        const float v = vote_value(plus, tie, has_tie, i);
        const float x = D::load(D::store(__fmul_rn(D::load(p[i]), decay)));  // p.mul_(decay)
        const float r = __fadd_rn(x, __fmul_rn(neg_lr, v));                  // p.add_(v, -lr)
        p[i] = is_nan_f32(r) ? D::nan() : D::store(r);
    }
}

#define APPLY_DECAYED_KERNEL(name, D)                                                            \
    extern "C" __global__ void name(D::T* __restrict__ p, const u32* __restrict__ plus,           \
                                    const u32* __restrict__ tie, int has_tie, u64 n, float lr,    \
                                    float decay) {                                                \
        apply_decayed_impl<D>(p, plus, tie, has_tie, n, lr, decay);                               \
    }
APPLY_DECAYED_KERNEL(apply_decayed_f32, F32)
APPLY_DECAYED_KERNEL(apply_decayed_f16, F16)
APPLY_DECAYED_KERNEL(apply_decayed_bf16, BF16)

// ---- Lion's local step fused with the pack (Chen et al. 2023; Distributed Lion, Liu et al. 2024)
// Per coordinate, with a non-finite g[i] counted and taken as +0:
//     c = m * beta1 + alpha1 * g     its vote bit packed as pack_f32 packs (0 as zero_bit)
//     m = m * beta2 + alpha2 * g     (after c: c reads the old m)
// as torch's _foreach_mul then _foreach_add_(alpha=) round it: the product m * beta rounded
// once, then "a + alpha * b", which nvcc compiles for torch, usually as one FMA. `fused` picks
// that form (fma(alpha, g, m * beta)) or two roundings; the caller measures torch's form on the
// device once (mpisign/cuda/torch_check.py). Warps as in pack: one ballot = one word. The count
// of non-finite entries is summed per warp and added to *nonfinite (zeroed by the caller).
__device__ __forceinline__ float add_scaled(float mb, float alpha, float g, int fused) {
    return fused ? __fmaf_rn(alpha, g, mb) : __fadd_rn(mb, __fmul_rn(alpha, g));
}

extern "C" __global__ void lion_update_pack_f32(const float* __restrict__ g, float* __restrict__ m,
                                                u64 n, float beta1, float alpha1, float beta2,
                                                float alpha2, int fused, int zero_bit,
                                                u32* __restrict__ out, u64* __restrict__ nonfinite) {
    const u32 lane = threadIdx.x & 31u;
    const u64 nwords = 2 * ((n + 63) / 64);  // includes the high half of the last uint64 word
    const u64 stride = grid_threads() >> 5;
    u64 bad = 0;
    for (u64 w = global_thread() >> 5; w < nwords; w += stride) {  // w is warp-uniform
        const u64 i = w * 32 + lane;
        u32 bit = 0u;
        if (i < n) {
            float gi = g[i];
            if ((__float_as_uint(gi) & 0x7f800000u) == 0x7f800000u) {  // NaN, +-inf
                gi = 0.0f;
                bad++;
            }
            const float mi = m[i];
            const float c = add_scaled(__fmul_rn(mi, beta1), alpha1, gi, fused);
            m[i] = add_scaled(__fmul_rn(mi, beta2), alpha2, gi, fused);
            bit = vote_bit<u32, 0x80000000u, 0x7f800000u>(__float_as_uint(c), (u32)zero_bit);
        }
        const u32 word = warp_ballot(bit);
        if (lane == 0) out[w] = word;
    }
    bad = warp_sum(bad);  // every lane of every warp gets here: the loop bounds are warp-uniform
    if (lane == 0u && bad != 0u) atomicAdd(nonfinite, bad);
}

// ---- disagreement: counts[r] += popcount((votes[r] ^ plus) & ~tie) over the n valid bits ----
// Worker r is blockIdx.y (grid-stride over gridDim.y), so the worker loop is block-uniform and
// every lane reaches warp_sum(); the caller zeroes counts first.
extern "C" __global__ void disagreement(const u32* __restrict__ votes, u32 m, u64 nwords, u64 n,
                                        const u32* __restrict__ plus, const u32* __restrict__ tie,
                                        int has_tie, u64* __restrict__ counts) {
    for (u32 r = blockIdx.y; r < m; r += gridDim.y) {
        u64 acc = 0;
        for (u64 k = global_thread(); k < nwords; k += grid_threads()) {
            u32 d = (votes[(u64)r * nwords + k] ^ plus[k]) & word_mask(k, n);
            if (has_tie) d &= ~tie[k];
            acc += (u64)__popc(d);
        }
        acc = warp_sum(acc);
        if ((threadIdx.x & 31u) == 0u && acc != 0u) atomicAdd(&counts[r], acc);
    }
}
