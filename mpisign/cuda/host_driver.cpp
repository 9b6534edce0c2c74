// C entry points over signs.cu run through the host shim, for mpisign/cuda/emulate.py (ctypes).
// Each run_<kernel>(grid, block, kernel args...) launches <kernel> on the CPU and returns 0, or -1
// with the reason in shim_last_error().
#include "host_shim.h"
#include "signs.cu"

#define LAUNCH(gx, gy, bx, call) shim::launch(dim3{gx, gy, 1}, dim3{bx, 1, 1}, [=] { call; })

extern "C" {

const char* shim_last_error() { return shim::last_error; }

int run_pack_f32(unsigned gx, unsigned bx, const u32* x, u64 n, int zero_bit, u32* out) {
    return LAUNCH(gx, 1, bx, pack_f32(x, n, zero_bit, out));
}
int run_pack_f16(unsigned gx, unsigned bx, const u16* x, u64 n, int zero_bit, u32* out) {
    return LAUNCH(gx, 1, bx, pack_f16(x, n, zero_bit, out));
}
int run_pack_bf16(unsigned gx, unsigned bx, const u16* x, u64 n, int zero_bit, u32* out) {
    return LAUNCH(gx, 1, bx, pack_bf16(x, n, zero_bit, out));
}

int run_tally_majority(unsigned gx, unsigned bx, const u32* votes, u32 m, u64 nwords, u64 n,
                       u32* plus, u32* tie) {
    return LAUNCH(gx, 1, bx, tally_majority(votes, m, nwords, n, plus, tie));
}

int run_apply_f32(unsigned gx, unsigned bx, float* p, const u32* plus, const u32* tie, int has_tie,
                  u64 n, float lr, float wd) {
    return LAUNCH(gx, 1, bx, apply_f32(p, plus, tie, has_tie, n, lr, wd));
}
int run_apply_f16(unsigned gx, unsigned bx, u16* p, const u32* plus, const u32* tie, int has_tie,
                  u64 n, float lr, float wd) {
    return LAUNCH(gx, 1, bx, apply_f16(p, plus, tie, has_tie, n, lr, wd));
}
int run_apply_bf16(unsigned gx, unsigned bx, u16* p, const u32* plus, const u32* tie, int has_tie,
                   u64 n, float lr, float wd) {
    return LAUNCH(gx, 1, bx, apply_bf16(p, plus, tie, has_tie, n, lr, wd));
}

int run_apply_decayed_f32(unsigned gx, unsigned bx, float* p, const u32* plus, const u32* tie,
                          int has_tie, u64 n, float lr, float decay) {
    return LAUNCH(gx, 1, bx, apply_decayed_f32(p, plus, tie, has_tie, n, lr, decay));
}
int run_apply_decayed_f16(unsigned gx, unsigned bx, u16* p, const u32* plus, const u32* tie,
                          int has_tie, u64 n, float lr, float decay) {
    return LAUNCH(gx, 1, bx, apply_decayed_f16(p, plus, tie, has_tie, n, lr, decay));
}
int run_apply_decayed_bf16(unsigned gx, unsigned bx, u16* p, const u32* plus, const u32* tie,
                           int has_tie, u64 n, float lr, float decay) {
    return LAUNCH(gx, 1, bx, apply_decayed_bf16(p, plus, tie, has_tie, n, lr, decay));
}

int run_lion_update_pack_f32(unsigned gx, unsigned bx, const float* g, float* m, u64 n,
                             float beta1, float alpha1, float beta2, float alpha2, int fused,
                             int zero_bit, u32* out, u64* nonfinite) {
    return LAUNCH(gx, 1, bx, lion_update_pack_f32(g, m, n, beta1, alpha1, beta2, alpha2, fused,
                                                  zero_bit, out, nonfinite));
}

int run_disagreement(unsigned gx, unsigned gy, unsigned bx, const u32* votes, u32 m, u64 nwords,
                     u64 n, const u32* plus, const u32* tie, int has_tie, u64* counts) {
    return LAUNCH(gx, gy, bx, disagreement(votes, m, nwords, n, plus, tie, has_tie, counts));
}

}  // extern "C"
