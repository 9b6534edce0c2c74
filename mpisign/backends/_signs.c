/* Compiled CPU kernels for packed signs: pack, unpack, apply (mpisign.native wraps them).
 *
 * The same results, bit for bit, as the numpy reference in mpisign/backends/packing.py, in one pass over
 * the floats instead of two to four:
 *
 *   pack    bit i of word i/64 = x[i] > 0 (zero_bit 0) or !(x[i] < 0) (zero_bit 1), so 0 and NaN
 *           pack as zero_bit; padding bits 0.              float32, float64, float16, bfloat16
 *   unpack  out[i] = +0.0 where tie, else +on (bit 1) or -on (bit 0).           the same four
 *   apply   p -= lr * (v + wd * p), v = +-1 or +0 at a tie; each operation rounded on its own
 *           (built with -ffp-contract=off: no fused multiply-add), as the reference and the GPU
 *           kernel do; without wd, p -= (+-lr or +0). Every NaN it writes is the canonical
 *           NaN (0x7fffffff, 0x7fffffffffffffff), as the GPU kernel writes: not x86's, which
 *           keeps an input NaN's sign and payload and makes 0xffc00000 of inf - inf.
 *                                                                           float32, float64
 *   apply_decayed  p = p * d - lr * v (Lion's decoupled weight decay, d = 1 - lr * wd): the
 *           product rounded, then the step, as torch's p.mul_(d); p.add_(v, alpha=-lr).
 *                                                                           float32, float64
 *   update_pack  Signum's momentum update (rounded as torch rounds it), the non-finite scrub and
 *           pack, in one pass instead of four.                              float32, float64
 *   lion_update_pack  Lion's: c = m * b1 + a1 * g packed, m = m * b2 + a2 * g, the scrub, in one
 *           pass instead of six.                                            float32, float64
 *           Both write, where given an address for it, the zero mask of what they pack (bit 1
 *           where the value is 0 or NaN: a coordinate that casts no vote) in the same pass.
 *
 * Half-precision apply stays on the reference: torch's own float->half rounding of NaN differs
 * between its scalar and vector paths, so only torch can match torch there.
 *
 * SIMD is chosen at run time: AVX2 bodies where the CPU has it (__builtin_cpu_supports), a
 * portable C body everywhere else. Every function releases the GIL. Addresses come from Python
 * as integers (numpy's ctypes.data, torch's data_ptr()); mpisign.native checks every argument.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>
#include <math.h>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define HAVE_X86 1
#else
#define HAVE_X86 0
#endif

enum { F32 = 0, F64 = 1, F16 = 2, BF16 = 3 };

/* ---- pack ------------------------------------------------------------------------------- */

/* Is a float16 (inf 0x7c00) or bfloat16 (inf 0x7f80) > 0, or < 0? Compared as bits: the
 * magnitude is nonzero and not NaN, and the sign bit says which side. */
static inline int half_pos(uint16_t h, uint16_t inf) {
    uint16_t mag = h & 0x7fff;
    return !(h >> 15) && mag != 0 && mag <= inf;
}
static inline int half_neg(uint16_t h, uint16_t inf) {
    uint16_t mag = h & 0x7fff;
    return (h >> 15) && mag != 0 && mag <= inf;
}

/* Words [w0, w1) from coordinates [64 w0, min(n, 64 w1)): the portable body, and the tail of
 * the SIMD ones. One loop per dtype and zero bit, with a fixed trip count for whole words, so
 * the compiler can vectorize it. */
#define PACK_LOOP(TYPE, BIT)                                                                  \
    for (int64_t j = w0; j < w1; j++) {                                                      \
        const TYPE *q = (const TYPE *)x + 64 * j;                                             \
        uint64_t word = 0;                                                                    \
        if (64 * j + 64 <= n) {                                                               \
            for (int i = 0; i < 64; i++) word |= (uint64_t)(BIT) << i;                        \
        } else {                                                                              \
            for (int i = 0; i < n - 64 * j; i++) word |= (uint64_t)(BIT) << i;                \
        }                                                                                     \
        out[j] = word;                                                                        \
    }

static void pack_scalar(const void *x, int dtype, int64_t n, int zero_bit, uint64_t *out,
                        int64_t w0, int64_t w1) {
    switch (dtype * 2 + zero_bit) {
    case 2 * F32:      PACK_LOOP(float, q[i] > 0.0f) break;
    case 2 * F32 + 1:  PACK_LOOP(float, !(q[i] < 0.0f)) break;
    case 2 * F64:      PACK_LOOP(double, q[i] > 0.0) break;
    case 2 * F64 + 1:  PACK_LOOP(double, !(q[i] < 0.0)) break;
    case 2 * F16:      PACK_LOOP(uint16_t, half_pos(q[i], 0x7c00)) break;
    case 2 * F16 + 1:  PACK_LOOP(uint16_t, !half_neg(q[i], 0x7c00)) break;
    case 2 * BF16:     PACK_LOOP(uint16_t, half_pos(q[i], 0x7f80)) break;
    default:           PACK_LOOP(uint16_t, !half_neg(q[i], 0x7f80)) break;
    }
}

#if HAVE_X86
/* AVX2: 8 floats (4 doubles) compared at once, their sign mask taken with movemask. Returns the
 * number of whole words done. _CMP_GT_OQ is false for NaN; _CMP_NLT_UQ (not less than) true. */
__attribute__((target("avx2")))
static int64_t pack_f32_avx2(const float *x, int64_t n, int zero_bit, uint64_t *out) {
    const __m256 zero = _mm256_setzero_ps();
    int64_t words = n / 64;
    for (int64_t j = 0; j < words; j++) {
        const float *p = x + 64 * j;
        uint64_t word = 0;
        for (int k = 0; k < 8; k++) {
            __m256 v = _mm256_loadu_ps(p + 8 * k);
            __m256 c = zero_bit ? _mm256_cmp_ps(v, zero, _CMP_NLT_UQ)
                                : _mm256_cmp_ps(v, zero, _CMP_GT_OQ);
            word |= (uint64_t)(uint32_t)_mm256_movemask_ps(c) << (8 * k);
        }
        out[j] = word;
    }
    return words;
}

__attribute__((target("avx2")))
static int64_t pack_f64_avx2(const double *x, int64_t n, int zero_bit, uint64_t *out) {
    const __m256d zero = _mm256_setzero_pd();
    int64_t words = n / 64;
    for (int64_t j = 0; j < words; j++) {
        const double *p = x + 64 * j;
        uint64_t word = 0;
        for (int k = 0; k < 16; k++) {
            __m256d v = _mm256_loadu_pd(p + 4 * k);
            __m256d c = zero_bit ? _mm256_cmp_pd(v, zero, _CMP_NLT_UQ)
                                 : _mm256_cmp_pd(v, zero, _CMP_GT_OQ);
            word |= (uint64_t)(uint32_t)_mm256_movemask_pd(c) << (4 * k);
        }
        out[j] = word;
    }
    return words;
}
#endif

static int use_avx2 = -1;  /* -1: not asked yet; MPISIGN_SIMD=portable turns it off */

static int avx2(void) {
    if (use_avx2 < 0) {
#if HAVE_X86
        const char *want = getenv("MPISIGN_SIMD");
        __builtin_cpu_init();
        use_avx2 = __builtin_cpu_supports("avx2") && !(want && strcmp(want, "portable") == 0);
#else
        use_avx2 = 0;
#endif
    }
    return use_avx2;
}

static void pack(const void *x, int dtype, int64_t n, int zero_bit, uint64_t *out) {
    int64_t done = 0;
#if HAVE_X86
    if (avx2() && dtype == F32) done = pack_f32_avx2(x, n, zero_bit, out);
    if (avx2() && dtype == F64) done = pack_f64_avx2(x, n, zero_bit, out);
#endif
    pack_scalar(x, dtype, n, zero_bit, out, done, (n + 63) / 64);
}

/* ---- unpack ----------------------------------------------------------------------------- */

/* Written on the bits of the output type: |on|'s bits, the sign bit from the plus bit, all
 * cleared at a tie (+0.0). Branch-free, so the compiler vectorizes it (AVX2 clone). */
#define UNPACK_BODY(UINT, SIGN)                                                               \
    for (int64_t j = 0; j < (n + 63) / 64; j++) {                                           \
        uint64_t w = plus[j], t = tie ? tie[j] : 0;                                           \
        int64_t end = n - 64 * j < 64 ? n - 64 * j : 64;                                      \
        UINT *o = out + 64 * j;                                                               \
        for (int64_t i = 0; i < end; i++) {                                                   \
            UINT neg = (UINT)(((~w) >> i) & 1) << SIGN;                                       \
            UINT keep = (UINT)0 - (UINT)(((~t) >> i) & 1);                                    \
            o[i] = (UINT)((neg | on) & keep);                                                 \
        }                                                                                     \
    }

#define UNPACK_FN(NAME, UINT, SIGN)                                                          \
    __attribute__((target_clones("avx2", "default")))                                        \
    static void NAME(const uint64_t *plus, const uint64_t *tie, int64_t n, UINT on,          \
                     UINT *out) { UNPACK_BODY(UINT, SIGN) }

#if HAVE_X86
UNPACK_FN(unpack32, uint32_t, 31)
UNPACK_FN(unpack64, uint64_t, 63)
UNPACK_FN(unpack16, uint16_t, 15)
#else
static void unpack32(const uint64_t *plus, const uint64_t *tie, int64_t n, uint32_t on,
                     uint32_t *out) { UNPACK_BODY(uint32_t, 31) }
static void unpack64(const uint64_t *plus, const uint64_t *tie, int64_t n, uint64_t on,
                     uint64_t *out) { UNPACK_BODY(uint64_t, 63) }
static void unpack16(const uint64_t *plus, const uint64_t *tie, int64_t n, uint16_t on,
                     uint16_t *out) { UNPACK_BODY(uint16_t, 15) }
#endif

/* ---- apply ------------------------------------------------------------------------------ */

enum { PLAIN = 0, COUPLED = 1, DECOUPLED = 2 };   /* apply's weight decay */

/* v = +-unit or +0 as above; then, with wd (decay == COUPLED), x - lr * (v + wd * x); with a
 * decoupled decay (decay == DECOUPLED, wd holds the factor d), x * d - v; else x - v (unit = lr);
 * a NaN result (unequal to itself) is stored as the canonical NaN: a compare and a select that
 * the compiler vectorizes. One inner loop for each case, so neither carries a branch. */
#define APPLY_LOOP(FLOAT, UINT, SIGN, UPDATE)                                                 \
    for (int64_t i = 0; i < end; i++) {                                                       \
        UINT neg = (UINT)(((~w) >> i) & 1) << SIGN;                                           \
        UINT keep = (UINT)0 - (UINT)(((~t) >> i) & 1);                                        \
        union { UINT u; FLOAT f; } v = {.u = (UINT)((neg | unit_bits) & keep)};               \
        FLOAT r = UPDATE;                                                                     \
        x[i] = r == r ? r : canon.f;                                                          \
    }

#define APPLY_BODY(FLOAT, UINT, SIGN)                                                         \
    union { FLOAT f; UINT u; } unit_ = {.f = unit};                                           \
    UINT unit_bits = unit_.u;                                                                 \
    const union { UINT u; FLOAT f; } canon = {.u = ~((UINT)1 << SIGN)};  /* all but sign */   \
    for (int64_t j = 0; j < (n + 63) / 64; j++) {                                           \
        uint64_t w = plus[j], t = tie ? tie[j] : 0;                                           \
        int64_t end = n - 64 * j < 64 ? n - 64 * j : 64;                                      \
        FLOAT *x = p + 64 * j;                                                                \
        if (decay == COUPLED) APPLY_LOOP(FLOAT, UINT, SIGN, x[i] - (v.f + wd * x[i]) * lr)    \
        else if (decay == DECOUPLED) APPLY_LOOP(FLOAT, UINT, SIGN, x[i] * wd - v.f)           \
        else APPLY_LOOP(FLOAT, UINT, SIGN, x[i] - v.f)                                        \
    }

#define APPLY_FN(NAME, FLOAT, UINT, SIGN)                                                    \
    __attribute__((target_clones("avx2", "default")))                                        \
    static void NAME(FLOAT *p, const uint64_t *plus, const uint64_t *tie, int64_t n,         \
                     FLOAT lr, FLOAT wd, int decay) {                                         \
        FLOAT unit = decay == COUPLED ? (FLOAT)1 : lr;                                        \
        APPLY_BODY(FLOAT, UINT, SIGN) }

static void apply32_scalar(float *p, const uint64_t *plus, const uint64_t *tie, int64_t n,
                           float lr, float wd, int decay) {
    float unit = decay == COUPLED ? 1.0f : lr;
    APPLY_BODY(float, uint32_t, 31)
}

#if HAVE_X86
APPLY_FN(apply64, double, uint64_t, 63)

/* 8 lanes of one byte of words: lane k all ones where bit k of the byte is 0. */
__attribute__((target("avx2")))
static inline __m256i zero_bits(uint64_t word, int byte) {
    const __m256i lanes = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
    __m256i b = _mm256_set1_epi32((int)((word >> (8 * byte)) & 0xff));
    return _mm256_cmpeq_epi32(_mm256_and_si256(b, lanes), _mm256_setzero_si256());
}

/* AVX2: whole words 8 floats at a time (v from the byte's bits, then the update, each operation
 * its own instruction: no FMA); the tail word on the scalar body. NaN results: a running sum of
 * the results is NaN if any of them is (and, harmlessly, after inf - inf or an overflow), and
 * only then does a second pass blend the NaN lanes to the canonical NaN. One add per 8 floats
 * costs less than a compare and a blend on each (wd > 0: +5% instead of +10% on an AMD EPYC). */
__attribute__((target("avx2")))
static void apply32_avx2(float *p, const uint64_t *plus, const uint64_t *tie, int64_t n,
                         float lr, float wd, int decay) {
    const __m256 sign = _mm256_castsi256_ps(_mm256_set1_epi32((int)0x80000000u));
    const __m256 unit = _mm256_set1_ps(decay == COUPLED ? 1.0f : lr), lrv = _mm256_set1_ps(lr),
                 wdv = _mm256_set1_ps(wd);
    const __m256 canon = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    int64_t words = n / 64;
    __m256 sum = _mm256_setzero_ps();
    for (int64_t j = 0; j < words; j++) {
        uint64_t w = plus[j], t = tie ? tie[j] : 0;
        float *x = p + 64 * j;
        for (int k = 0; k < 8; k++) {
            __m256 minus = _mm256_castsi256_ps(zero_bits(w, k));
            __m256 v = _mm256_or_ps(unit, _mm256_and_ps(minus, sign));
            if (t) v = _mm256_and_ps(v, _mm256_castsi256_ps(zero_bits(t, k)));  /* tie: +0 */
            __m256 xv = _mm256_loadu_ps(x + 8 * k);
            if (decay == COUPLED) v = _mm256_mul_ps(_mm256_add_ps(v, _mm256_mul_ps(wdv, xv)), lrv);
            else if (decay == DECOUPLED) xv = _mm256_mul_ps(xv, wdv);
            __m256 r = _mm256_sub_ps(xv, v);
            sum = _mm256_add_ps(sum, r);
            _mm256_storeu_ps(x + 8 * k, r);
        }
    }
    if (_mm256_movemask_ps(_mm256_cmp_ps(sum, sum, _CMP_UNORD_Q))) {   /* some result is NaN */
        for (int64_t i = 0; i < 64 * words; i += 8) {
            __m256 r = _mm256_loadu_ps(p + i);
            r = _mm256_blendv_ps(r, canon, _mm256_cmp_ps(r, r, _CMP_UNORD_Q));
            _mm256_storeu_ps(p + i, r);
        }
    }
    if (n % 64)
        apply32_scalar(p + 64 * words, plus + words, tie ? tie + words : NULL, n % 64, lr, wd,
                       decay);
}
#else
static void apply64(double *p, const uint64_t *plus, const uint64_t *tie, int64_t n, double lr,
                    double wd, int decay) { double unit = decay == COUPLED ? 1.0 : lr;
                    APPLY_BODY(double, uint64_t, 63) }
#endif

static void apply32(float *p, const uint64_t *plus, const uint64_t *tie, int64_t n, float lr,
                    float wd, int decay) {
#if HAVE_X86
    if (avx2()) { apply32_avx2(p, plus, tie, n, lr, wd, decay); return; }
#endif
    apply32_scalar(p, plus, tie, n, lr, wd, decay);
}

/* ---- momentum update, scrub and pack in one pass ------------------------------------------- */

/* What Signum does to one parameter before the vote, fused: a non-finite gradient entry counts
 * and becomes 0; with a momentum buffer m:  m = m * beta;  m = m + alpha * g  (torch's
 * _foreach_mul_ then _foreach_add_(alpha=...); `fused` says whether torch's add rounds a * g + m
 * once, as an FMA, or twice, which mpisign.native measures on torch itself); then the sign bits
 * of m, or of g without a buffer. Returns the number of non-finite entries. */
#define UPDATE_PACK_BODY(FLOAT, UINT, EXP, FMA)                                               \
    int64_t bad = 0;                                                                          \
    for (int64_t j = 0; j < (n + 63) / 64; j++) {                                           \
        uint64_t word = 0, zword = 0;                                                         \
        int64_t end = n - 64 * j < 64 ? n - 64 * j : 64;                                      \
        for (int64_t i = 0; i < end; i++) {                                                   \
            int64_t k = 64 * j + i;                                                           \
            FLOAT gi = g[k];                                                                  \
            UINT gb; memcpy(&gb, &gi, sizeof gb);                                             \
            if ((gb & EXP) == EXP) { gi = 0; bad++; }                                         \
            FLOAT v = gi;                                                                     \
            if (m) {                                                                          \
                FLOAT mk = m[k] * beta;                                                       \
                v = m[k] = fused ? FMA(gi, alpha, mk) : mk + alpha * gi;                       \
            }                                                                                 \
            word |= (uint64_t)(zero_bit ? !(v < 0) : v > 0) << i;                             \
            zword |= (uint64_t)!(v > 0 || v < 0) << i;                                       \
        }                                                                                     \
        out[j] = word;                                                                        \
        if (zout) zout[j] = zword;                                                           \
    }                                                                                         \
    return bad;

static int64_t update_pack32_scalar(const float *g, float *m, int64_t n, float beta,
                                    float alpha, int fused, int zero_bit, uint64_t *out, uint64_t *zout) {
    UPDATE_PACK_BODY(float, uint32_t, 0x7f800000u, fmaf)
}

static int64_t update_pack64(const double *g, double *m, int64_t n, double beta, double alpha,
                             int fused, int zero_bit, uint64_t *out, uint64_t *zout) {
    UPDATE_PACK_BODY(double, uint64_t, 0x7ff0000000000000ull, fma)
}

#if HAVE_X86
/* AVX2 (+FMA where torch fuses): 8 lanes at a time over whole words, the tail on the scalar
 * body. Non-finite lanes: exponent all ones; zeroed with an and-not, counted by popcount. */
__attribute__((target("avx2,fma")))
static int64_t update_pack32_avx2(const float *g, float *m, int64_t n, float beta, float alpha,
                                  int fused, int zero_bit, uint64_t *out, uint64_t *zout) {
    const __m256i exp = _mm256_set1_epi32(0x7f800000);
    const __m256 zero = _mm256_setzero_ps(), bv = _mm256_set1_ps(beta),
                 av = _mm256_set1_ps(alpha);
    int64_t words = n / 64, bad = 0;
    for (int64_t j = 0; j < words; j++) {
        uint64_t word = 0, zword = 0;
        for (int k = 0; k < 8; k++) {
            int64_t at = 64 * j + 8 * k;
            __m256 gv = _mm256_loadu_ps(g + at);
            __m256i e = _mm256_and_si256(_mm256_castps_si256(gv), exp);
            __m256 nonfinite = _mm256_castsi256_ps(_mm256_cmpeq_epi32(e, exp));
            bad += __builtin_popcount((unsigned)_mm256_movemask_ps(nonfinite));
            gv = _mm256_andnot_ps(nonfinite, gv);
            __m256 v = gv;
            if (m) {
                __m256 mk = _mm256_mul_ps(_mm256_loadu_ps(m + at), bv);
                v = fused ? _mm256_fmadd_ps(gv, av, mk) : _mm256_add_ps(mk, _mm256_mul_ps(av, gv));
                _mm256_storeu_ps(m + at, v);
            }
            __m256 c = zero_bit ? _mm256_cmp_ps(v, zero, _CMP_NLT_UQ)
                                : _mm256_cmp_ps(v, zero, _CMP_GT_OQ);
            word |= (uint64_t)(uint32_t)_mm256_movemask_ps(c) << (8 * k);
            if (zout)
                zword |= (uint64_t)(uint32_t)_mm256_movemask_ps(
                             _mm256_cmp_ps(v, zero, _CMP_EQ_UQ)) << (8 * k);
        }
        out[j] = word;
        if (zout) zout[j] = zword;
    }
    if (n % 64)
        bad += update_pack32_scalar(g + 64 * words, m ? m + 64 * words : NULL, n % 64, beta,
                                    alpha, fused, zero_bit, out + words,
                                    zout ? zout + words : NULL);
    return bad;
}

static int have_fma(void) {
    static int known = -1;
    if (known < 0) { __builtin_cpu_init(); known = __builtin_cpu_supports("fma"); }
    return known;
}
#endif

static int64_t update_pack32(const float *g, float *m, int64_t n, float beta, float alpha,
                             int fused, int zero_bit, uint64_t *out, uint64_t *zout) {
#if HAVE_X86
    if (avx2() && have_fma())
        return update_pack32_avx2(g, m, n, beta, alpha, fused, zero_bit, out, zout);
#endif
    return update_pack32_scalar(g, m, n, beta, alpha, fused, zero_bit, out, zout);
}

/* ---- Lion's local step, scrub and pack in one pass ---------------------------------------- */

/* What Lion does to one parameter before the vote, fused: a non-finite gradient entry counts
 * and becomes 0; c = m * b1; c = c + a1 * g (its sign is packed); m = m * b2; m = m + a2 * g,
 * each add rounded once (an FMA) or twice as torch rounds its add with alpha (`fused`, measured
 * on torch by mpisign.native, as for Signum). Returns the number of non-finite entries. */
#define LION_PACK_BODY(FLOAT, UINT, EXP, FMA)                                                 \
    int64_t bad = 0;                                                                          \
    for (int64_t j = 0; j < (n + 63) / 64; j++) {                                           \
        uint64_t word = 0, zword = 0;                                                         \
        int64_t end = n - 64 * j < 64 ? n - 64 * j : 64;                                      \
        for (int64_t i = 0; i < end; i++) {                                                   \
            int64_t k = 64 * j + i;                                                           \
            FLOAT gi = g[k];                                                                  \
            UINT gb; memcpy(&gb, &gi, sizeof gb);                                             \
            if ((gb & EXP) == EXP) { gi = 0; bad++; }                                         \
            FLOAT c1 = m[k] * b1, m2 = m[k] * b2;                                             \
            FLOAT c = fused ? FMA(gi, a1, c1) : c1 + a1 * gi;                                 \
            m[k] = fused ? FMA(gi, a2, m2) : m2 + a2 * gi;                                    \
            word |= (uint64_t)(zero_bit ? !(c < 0) : c > 0) << i;                             \
            zword |= (uint64_t)!(c > 0 || c < 0) << i;                                       \
        }                                                                                     \
        out[j] = word;                                                                        \
        if (zout) zout[j] = zword;                                                           \
    }                                                                                         \
    return bad;

static int64_t lion_pack32_scalar(const float *g, float *m, int64_t n, float b1, float a1,
                                  float b2, float a2, int fused, int zero_bit, uint64_t *out, uint64_t *zout) {
    LION_PACK_BODY(float, uint32_t, 0x7f800000u, fmaf)
}

static int64_t lion_pack64(const double *g, double *m, int64_t n, double b1, double a1,
                           double b2, double a2, int fused, int zero_bit, uint64_t *out, uint64_t *zout) {
    LION_PACK_BODY(double, uint64_t, 0x7ff0000000000000ull, fma)
}

#if HAVE_X86
/* AVX2 (+FMA where torch fuses), as update_pack32_avx2: 8 lanes at a time over whole words. */
__attribute__((target("avx2,fma")))
static int64_t lion_pack32_avx2(const float *g, float *m, int64_t n, float b1, float a1,
                                float b2, float a2, int fused, int zero_bit, uint64_t *out, uint64_t *zout) {
    const __m256i exp = _mm256_set1_epi32(0x7f800000);
    const __m256 zero = _mm256_setzero_ps(), b1v = _mm256_set1_ps(b1), a1v = _mm256_set1_ps(a1),
                 b2v = _mm256_set1_ps(b2), a2v = _mm256_set1_ps(a2);
    int64_t words = n / 64, bad = 0;
    for (int64_t j = 0; j < words; j++) {
        uint64_t word = 0, zword = 0;
        for (int k = 0; k < 8; k++) {
            int64_t at = 64 * j + 8 * k;
            __m256 gv = _mm256_loadu_ps(g + at), mv = _mm256_loadu_ps(m + at);
            __m256i e = _mm256_and_si256(_mm256_castps_si256(gv), exp);
            __m256 nonfinite = _mm256_castsi256_ps(_mm256_cmpeq_epi32(e, exp));
            bad += __builtin_popcount((unsigned)_mm256_movemask_ps(nonfinite));
            gv = _mm256_andnot_ps(nonfinite, gv);
            __m256 c1 = _mm256_mul_ps(mv, b1v), m2 = _mm256_mul_ps(mv, b2v);
            __m256 c = fused ? _mm256_fmadd_ps(gv, a1v, c1) : _mm256_add_ps(c1, _mm256_mul_ps(a1v, gv));
            mv = fused ? _mm256_fmadd_ps(gv, a2v, m2) : _mm256_add_ps(m2, _mm256_mul_ps(a2v, gv));
            _mm256_storeu_ps(m + at, mv);
            __m256 bits = zero_bit ? _mm256_cmp_ps(c, zero, _CMP_NLT_UQ)
                                   : _mm256_cmp_ps(c, zero, _CMP_GT_OQ);
            word |= (uint64_t)(uint32_t)_mm256_movemask_ps(bits) << (8 * k);
            if (zout)
                zword |= (uint64_t)(uint32_t)_mm256_movemask_ps(
                             _mm256_cmp_ps(c, zero, _CMP_EQ_UQ)) << (8 * k);
        }
        out[j] = word;
        if (zout) zout[j] = zword;
    }
    if (n % 64)
        bad += lion_pack32_scalar(g + 64 * words, m + 64 * words, n % 64, b1, a1, b2, a2, fused,
                                  zero_bit, out + words, zout ? zout + words : NULL);
    return bad;
}
#endif

static int64_t lion_pack32(const float *g, float *m, int64_t n, float b1, float a1, float b2,
                           float a2, int fused, int zero_bit, uint64_t *out, uint64_t *zout) {
#if HAVE_X86
    if (avx2() && have_fma())
        return lion_pack32_avx2(g, m, n, b1, a1, b2, a2, fused, zero_bit, out, zout);
#endif
    return lion_pack32_scalar(g, m, n, b1, a1, b2, a2, fused, zero_bit, out, zout);
}

/* ---- Python ----------------------------------------------------------------------------- */

static int args_ok(Py_ssize_t nargs, Py_ssize_t want, const char *name) {
    if (nargs == want) return 1;
    PyErr_Format(PyExc_TypeError, "%s takes %zd arguments, got %zd", name, want, nargs);
    return 0;
}

/* pack(x_addr, dtype, n, zero_bit, out_addr) */
static PyObject *py_pack(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (!args_ok(nargs, 5, "pack")) return NULL;
    void *x = PyLong_AsVoidPtr(args[0]);
    int dtype = (int)PyLong_AsLong(args[1]);
    int64_t n = PyLong_AsLongLong(args[2]);
    int zero_bit = (int)PyLong_AsLong(args[3]);
    uint64_t *out = PyLong_AsVoidPtr(args[4]);
    if (PyErr_Occurred()) return NULL;
    Py_BEGIN_ALLOW_THREADS
    pack(x, dtype, n, zero_bit, out);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

/* unpack(plus_addr, tie_addr or 0, n, dtype, out_addr, on): on is |value| for a "+" bit */
static PyObject *py_unpack(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (!args_ok(nargs, 6, "unpack")) return NULL;
    const uint64_t *plus = PyLong_AsVoidPtr(args[0]);
    const uint64_t *tie = PyLong_AsVoidPtr(args[1]);
    int64_t n = PyLong_AsLongLong(args[2]);
    int dtype = (int)PyLong_AsLong(args[3]);
    void *out = PyLong_AsVoidPtr(args[4]);
    unsigned long long on = PyLong_AsUnsignedLongLong(args[5]);  /* |on|'s bits in dtype */
    if (PyErr_Occurred()) return NULL;
    Py_BEGIN_ALLOW_THREADS
    switch (dtype) {
    case F32: unpack32(plus, tie, n, (uint32_t)on, out); break;
    case F64: unpack64(plus, tie, n, (uint64_t)on, out); break;
    default:  unpack16(plus, tie, n, (uint16_t)on, out); break;
    }
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

/* apply(p_addr, dtype, n, plus_addr, tie_addr or 0, lr, wd) */
static PyObject *py_apply(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (!args_ok(nargs, 7, "apply")) return NULL;
    void *p = PyLong_AsVoidPtr(args[0]);
    int dtype = (int)PyLong_AsLong(args[1]);
    int64_t n = PyLong_AsLongLong(args[2]);
    const uint64_t *plus = PyLong_AsVoidPtr(args[3]);
    const uint64_t *tie = PyLong_AsVoidPtr(args[4]);
    double lr = PyFloat_AsDouble(args[5]), wd = PyFloat_AsDouble(args[6]);
    if (PyErr_Occurred()) return NULL;
    if (dtype != F32 && dtype != F64) {
        PyErr_SetString(PyExc_ValueError, "apply takes float32 or float64 parameters");
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    /* Decay or not on the value used: a wd that float32 rounds to 0 decays nothing. */
    if (dtype == F32) apply32(p, plus, tie, n, (float)lr, (float)wd, (float)wd != 0.0f);
    else apply64(p, plus, tie, n, lr, wd, wd != 0.0);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

/* update_pack(g_addr, m_addr or 0, dtype, n, beta, alpha, fused, zero_bit, out_addr,
 *             zout_addr or 0) -> bad. zout: where given, bit i = 1 where the packed value is 0
 * or NaN (a coordinate that casts no vote) */
static PyObject *py_update_pack(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (!args_ok(nargs, 10, "update_pack")) return NULL;
    const void *g = PyLong_AsVoidPtr(args[0]);
    void *m = PyLong_AsVoidPtr(args[1]);
    int dtype = (int)PyLong_AsLong(args[2]);
    int64_t n = PyLong_AsLongLong(args[3]);
    double beta = PyFloat_AsDouble(args[4]), alpha = PyFloat_AsDouble(args[5]);
    int fused = PyObject_IsTrue(args[6]);
    int zero_bit = (int)PyLong_AsLong(args[7]);
    uint64_t *out = PyLong_AsVoidPtr(args[8]), *zout = PyLong_AsVoidPtr(args[9]);
    if (PyErr_Occurred()) return NULL;
    if (dtype != F32 && dtype != F64) {
        PyErr_SetString(PyExc_ValueError, "update_pack takes float32 or float64 tensors");
        return NULL;
    }
    int64_t bad;
    Py_BEGIN_ALLOW_THREADS
    if (dtype == F32)
        bad = update_pack32(g, m, n, (float)beta, (float)alpha, fused, zero_bit, out, zout);
    else
        bad = update_pack64(g, m, n, beta, alpha, fused, zero_bit, out, zout);
    Py_END_ALLOW_THREADS
    return PyLong_FromLongLong(bad);
}

/* apply_decayed(p_addr, dtype, n, plus_addr, tie_addr or 0, lr, decay): p = p * decay - lr * v */
static PyObject *py_apply_decayed(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (!args_ok(nargs, 7, "apply_decayed")) return NULL;
    void *p = PyLong_AsVoidPtr(args[0]);
    int dtype = (int)PyLong_AsLong(args[1]);
    int64_t n = PyLong_AsLongLong(args[2]);
    const uint64_t *plus = PyLong_AsVoidPtr(args[3]);
    const uint64_t *tie = PyLong_AsVoidPtr(args[4]);
    double lr = PyFloat_AsDouble(args[5]), decay = PyFloat_AsDouble(args[6]);
    if (PyErr_Occurred()) return NULL;
    if (dtype != F32 && dtype != F64) {
        PyErr_SetString(PyExc_ValueError, "apply_decayed takes float32 or float64 parameters");
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    /* A factor that rounds to 1 multiplies by 1: the plain step, as torch's mul_ by 1 is. */
    if (dtype == F32)
        apply32(p, plus, tie, n, (float)lr, (float)decay, (float)decay != 1.0f ? DECOUPLED : PLAIN);
    else
        apply64(p, plus, tie, n, lr, decay, decay != 1.0 ? DECOUPLED : PLAIN);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

/* lion_update_pack(g_addr, m_addr, dtype, n, b1, a1, b2, a2, fused, zero_bit, out_addr,
 *                  zout_addr or 0) -> bad. zout: as update_pack's, for c */
static PyObject *py_lion_update_pack(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (!args_ok(nargs, 12, "lion_update_pack")) return NULL;
    const void *g = PyLong_AsVoidPtr(args[0]);
    void *m = PyLong_AsVoidPtr(args[1]);
    int dtype = (int)PyLong_AsLong(args[2]);
    int64_t n = PyLong_AsLongLong(args[3]);
    double b1 = PyFloat_AsDouble(args[4]), a1 = PyFloat_AsDouble(args[5]);
    double b2 = PyFloat_AsDouble(args[6]), a2 = PyFloat_AsDouble(args[7]);
    int fused = PyObject_IsTrue(args[8]);
    int zero_bit = (int)PyLong_AsLong(args[9]);
    uint64_t *out = PyLong_AsVoidPtr(args[10]), *zout = PyLong_AsVoidPtr(args[11]);
    if (PyErr_Occurred()) return NULL;
    if (dtype != F32 && dtype != F64) {
        PyErr_SetString(PyExc_ValueError, "lion_update_pack takes float32 or float64 g and m");
        return NULL;
    }
    int64_t bad;
    Py_BEGIN_ALLOW_THREADS
    if (dtype == F32)
        bad = lion_pack32(g, m, n, (float)b1, (float)a1, (float)b2, (float)a2, fused, zero_bit,
                          out, zout);
    else
        bad = lion_pack64(g, m, n, b1, a1, b2, a2, fused, zero_bit, out, zout);
    Py_END_ALLOW_THREADS
    return PyLong_FromLongLong(bad);
}

static PyObject *py_simd(PyObject *self, PyObject *unused) {
    return PyUnicode_FromString(avx2() ? "avx2" : "portable");
}

static PyMethodDef methods[] = {
    {"pack", (PyCFunction)(void (*)(void))py_pack, METH_FASTCALL, "pack signs into words"},
    {"unpack", (PyCFunction)(void (*)(void))py_unpack, METH_FASTCALL, "words to +-on / 0"},
    {"apply", (PyCFunction)(void (*)(void))py_apply, METH_FASTCALL, "p -= lr * (v + wd p)"},
    {"update_pack", (PyCFunction)(void (*)(void))py_update_pack, METH_FASTCALL,
     "momentum update, non-finite scrub and pack in one pass"},
    {"apply_decayed", (PyCFunction)(void (*)(void))py_apply_decayed, METH_FASTCALL,
     "p = p * decay - lr * v"},
    {"lion_update_pack", (PyCFunction)(void (*)(void))py_lion_update_pack, METH_FASTCALL,
     "Lion's update, non-finite scrub and pack in one pass"},
    {"simd", py_simd, METH_NOARGS, "the instruction set the kernels use here"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_signs", "Compiled CPU kernels for packed signs.", -1, methods,
};

PyMODINIT_FUNC PyInit__signs(void) { return PyModule_Create(&module); }
