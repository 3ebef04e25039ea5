/* The packed W2 GEMV's inner step in CUDA C, linked into gpu.matmul.gemv_quad_kernel on a real
 * GPU (numba-cuda compiles this file with NVRTC when the kernel is first launched).
 *
 * It replaces the Python device function gpu.matmul._w2_quad_step (which the CUDA simulator runs
 * and the simulator tests check) and computes the same sums; the orchestration, the layout
 * (docs/FORMAT.md) and the reference stay in Python. What C adds: one 16-byte vector load per
 * row for 4 packed words (64 codes at 2 bits) and 16-byte loads of 8 fp16 activations, read
 * through the read-only cache, converted with cvt.f32.f16; no shared memory, no barrier.
 *
 * Header-free (no cuda_fp16.h), so it compiles with a bare NVRTC. Numba's calling convention:
 * extern "C", the declared result through the first pointer, return 0. Arrays arrive as
 * pointers to their first element (cffi's from_buffer); the indices say where to read.
 *
 *   acc[k·batch + b] += scale[o0 + k, g] · Σ_c x[b, c]·q[o0 + k, c] + zero[o0 + k, g] · Σ_c x[b, c]
 *
 * over the 64 columns c = 16·word … 16·word + 63, for k < rows ≤ W2_QUAD_MAX_ROWS. The caller
 * guarantees: word % 4 == 0, nwords % 4 == 0 (16-byte aligned rows), the 64 columns in one
 * group g, x C-contiguous fp16 (batch, n) with n % 64 == 0.
 */

#define W2_QUAD_MAX_ROWS 8

static __device__ __forceinline__ float half_bits_to_float(unsigned int bits16) {
    float f;
    unsigned short h = (unsigned short)bits16;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}

static __device__ __forceinline__ unsigned int quad_word(const uint4 &q, int i) {
    return i == 0 ? q.x : (i == 1 ? q.y : (i == 2 ? q.z : q.w));
}

extern "C" __device__ int w2_quad_step(int *ret, const unsigned int *words, long long nwords, long long o0,
                                       int rows, long long word, const unsigned short *x, long long n,
                                       int batch, const float *scale, const float *zero, long long G,
                                       long long g, float *acc) {
    uint4 q[W2_QUAD_MAX_ROWS];
#pragma unroll
    for (int k = 0; k < W2_QUAD_MAX_ROWS; ++k)  /* all rows' loads in flight before any use */
        if (k < rows)
            q[k] = __ldg(reinterpret_cast<const uint4 *>(words + (o0 + k) * nwords + word));
    for (int b = 0; b < batch; ++b) {
        const uint4 *xv = reinterpret_cast<const uint4 *>(x + b * n + word * 16);
        float dq[W2_QUAD_MAX_ROWS];
        float sx = 0.0f;
#pragma unroll
        for (int k = 0; k < W2_QUAD_MAX_ROWS; ++k)
            dq[k] = 0.0f;
#pragma unroll
        for (int v = 0; v < 8; ++v) {  /* 8 fp16 per load: columns 8v … 8v + 7 of the quad */
            const uint4 h = __ldg(xv + v);
            const unsigned int hs[4] = {h.x, h.y, h.z, h.w};
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const float lo = half_bits_to_float(hs[e] & 0xffffu);
                const float hi = half_bits_to_float(hs[e] >> 16);
                sx += lo;
                sx += hi;
                const int shift = 16 * (v & 1) + 4 * e;  /* column 8v + 2e is code (8v + 2e) % 16 of word v / 2 */
#pragma unroll
                for (int k = 0; k < W2_QUAD_MAX_ROWS; ++k) {
                    if (k < rows) {
                        const unsigned int w = quad_word(q[k], v >> 1);
                        dq[k] = fmaf(lo, (float)((w >> shift) & 3u), dq[k]);
                        dq[k] = fmaf(hi, (float)((w >> (shift + 2)) & 3u), dq[k]);
                    }
                }
            }
        }
#pragma unroll
        for (int k = 0; k < W2_QUAD_MAX_ROWS; ++k)
            if (k < rows)
                acc[k * batch + b] += scale[(o0 + k) * G + g] * dq[k] + zero[(o0 + k) * G + g] * sx;
    }
    *ret = 0;
    return 0;
}
