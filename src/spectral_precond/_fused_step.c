/*
 * The forward and backward pass of one training step of two-layer ReLU networks
 * that share their inputs, fused into one loop per model (float32, x86-64).
 *
 * For one model with inputs X (n x k, a column of ones included), first layer
 * A (k x h), head w (h) and bias b, labels y (n), it computes
 *
 *     r = relu(X A) w + b - y              the residuals (n)
 *     E = X^T (r * 1[X A > 0])             (k x h)
 *     G = E * w (each column j times w_j)  the first layer's gradient, up to 2 / n
 *     gw_j = sum_q E_qj A_qj               the head's gradient (relu(z) = 1[z > 0] z)
 *     gb = sum_i r_i                       the head bias's gradient
 *
 * without writing relu(X A) or the mask to memory as separate passes: the
 * pre-activations of four samples at a time are formed in registers, their ReLU
 * and head product are accumulated at once, and the residual-weighted mask lands
 * in a scratch matrix D (n x h) that stays in the core's cache, from which E is
 * accumulated with its tile in registers. A NaN in X A reaches r (max(0, z) is
 * written so that it returns z when z is NaN), so a diverging model is seen.
 *
 * Two builds of the same loops: AVX-512 (16 lanes) and AVX2 with FMA (8 lanes).
 * The caller asks fused_step_variant() which one this CPU runs.
 */
#include <stddef.h>
#include <string.h>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>

int fused_step_variant(void)
{
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f"))
        return 2;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
        return 1;
    return 0;
}

/* ---------------------------------------------------------------- AVX-512 */
#define T512 __attribute__((target("avx512f")))

T512 static inline __mmask16 mask16(ptrdiff_t remaining)
{
    if (remaining >= 16)
        return (__mmask16)0xFFFF;
    return remaining <= 0 ? (__mmask16)0 : (__mmask16)((1u << remaining) - 1u);
}

T512 static float model512(ptrdiff_t n, ptrdiff_t k, ptrdiff_t h, const float *X,
                           const float *A, ptrdiff_t lda, const float *w, float b,
                           const float *y, float *r, float *D, float *G, float *gw)
{
    const __m512 zero = _mm512_setzero_ps();
    float rsum = 0.0f;
    for (ptrdiff_t i = 0; i < n; i += 4) {
        const ptrdiff_t rows = n - i < 4 ? n - i : 4;
        /* Rows past the end are never read; their pointers stay inside X. */
        const float *x0 = X + i * k, *x1 = rows > 1 ? x0 + k : x0;
        const float *x2 = rows > 2 ? x1 + k : x0, *x3 = rows > 3 ? x2 + k : x0;
        __m512 h0 = zero, h1 = zero, h2 = zero, h3 = zero;
        for (ptrdiff_t j = 0; j < h; j += 16) {
            const __mmask16 m = mask16(h - j);
            __m512 z0 = zero, z1 = zero, z2 = zero, z3 = zero;
            for (ptrdiff_t q = 0; q < k; q++) {
                const __m512 a = _mm512_maskz_loadu_ps(m, A + q * lda + j);
                z0 = _mm512_fmadd_ps(_mm512_set1_ps(x0[q]), a, z0);
                if (rows > 1) z1 = _mm512_fmadd_ps(_mm512_set1_ps(x1[q]), a, z1);
                if (rows > 2) z2 = _mm512_fmadd_ps(_mm512_set1_ps(x2[q]), a, z2);
                if (rows > 3) z3 = _mm512_fmadd_ps(_mm512_set1_ps(x3[q]), a, z3);
            }
            const __m512 wj = _mm512_maskz_loadu_ps(m, w + j);
            h0 = _mm512_fmadd_ps(wj, _mm512_max_ps(zero, z0), h0);
            h1 = _mm512_fmadd_ps(wj, _mm512_max_ps(zero, z1), h1);
            h2 = _mm512_fmadd_ps(wj, _mm512_max_ps(zero, z2), h2);
            h3 = _mm512_fmadd_ps(wj, _mm512_max_ps(zero, z3), h3);
            _mm512_mask_storeu_ps(D + i * h + j, m, z0);
            if (rows > 1) _mm512_mask_storeu_ps(D + (i + 1) * h + j, m, z1);
            if (rows > 2) _mm512_mask_storeu_ps(D + (i + 2) * h + j, m, z2);
            if (rows > 3) _mm512_mask_storeu_ps(D + (i + 3) * h + j, m, z3);
        }
        const __m512 heads[4] = {h0, h1, h2, h3};
        for (ptrdiff_t q = 0; q < rows; q++) {
            const float res = _mm512_reduce_add_ps(heads[q]) + b - y[i + q];
            r[i + q] = res;
            rsum += res;
            const __m512 rv = _mm512_set1_ps(res);
            float *row = D + (i + q) * h;
            for (ptrdiff_t j = 0; j < h; j += 16) {
                const __mmask16 m = mask16(h - j);
                const __m512 z = _mm512_maskz_loadu_ps(m, row + j);
                const __mmask16 on = _mm512_cmp_ps_mask(z, zero, _CMP_GT_OQ);
                _mm512_mask_storeu_ps(row + j, m, _mm512_maskz_mov_ps(on, rv));
            }
        }
    }
    ptrdiff_t q = 0;
    for (; q + 4 <= k; q += 4) {
        for (ptrdiff_t j = 0; j < h; j += 32) {
            const __mmask16 m0 = mask16(h - j), m1 = mask16(h - j - 16);
            __m512 g00 = zero, g01 = zero, g10 = zero, g11 = zero;
            __m512 g20 = zero, g21 = zero, g30 = zero, g31 = zero;
            for (ptrdiff_t i = 0; i < n; i++) {
                const float *d = D + i * h + j, *x = X + i * k + q;
                const __m512 da = _mm512_maskz_loadu_ps(m0, d);
                const __m512 db = _mm512_maskz_loadu_ps(m1, d + 16);
                __m512 xb = _mm512_set1_ps(x[0]);
                g00 = _mm512_fmadd_ps(xb, da, g00); g01 = _mm512_fmadd_ps(xb, db, g01);
                xb = _mm512_set1_ps(x[1]);
                g10 = _mm512_fmadd_ps(xb, da, g10); g11 = _mm512_fmadd_ps(xb, db, g11);
                xb = _mm512_set1_ps(x[2]);
                g20 = _mm512_fmadd_ps(xb, da, g20); g21 = _mm512_fmadd_ps(xb, db, g21);
                xb = _mm512_set1_ps(x[3]);
                g30 = _mm512_fmadd_ps(xb, da, g30); g31 = _mm512_fmadd_ps(xb, db, g31);
            }
            const __m512 e[8] = {g00, g01, g10, g11, g20, g21, g30, g31};
            const __m512 w0 = _mm512_maskz_loadu_ps(m0, w + j), w1 = _mm512_maskz_loadu_ps(m1, w + j + 16);
            __m512 s0 = q ? _mm512_maskz_loadu_ps(m0, gw + j) : zero;
            __m512 s1 = q ? _mm512_maskz_loadu_ps(m1, gw + j + 16) : zero;
            for (int t = 0; t < 4; t++) {
                const float *a = A + (q + t) * lda + j;
                float *g = G + (q + t) * h + j;
                s0 = _mm512_fmadd_ps(e[2 * t], _mm512_maskz_loadu_ps(m0, a), s0);
                s1 = _mm512_fmadd_ps(e[2 * t + 1], _mm512_maskz_loadu_ps(m1, a + 16), s1);
                _mm512_mask_storeu_ps(g, m0, _mm512_mul_ps(e[2 * t], w0));
                _mm512_mask_storeu_ps(g + 16, m1, _mm512_mul_ps(e[2 * t + 1], w1));
            }
            _mm512_mask_storeu_ps(gw + j, m0, s0);
            _mm512_mask_storeu_ps(gw + j + 16, m1, s1);
        }
    }
    for (; q < k; q++) {
        for (ptrdiff_t j = 0; j < h; j += 16) {
            const __mmask16 m = mask16(h - j);
            __m512 g = zero;
            for (ptrdiff_t i = 0; i < n; i++)
                g = _mm512_fmadd_ps(_mm512_set1_ps(X[i * k + q]),
                                    _mm512_maskz_loadu_ps(m, D + i * h + j), g);
            const __m512 s = q ? _mm512_maskz_loadu_ps(m, gw + j) : zero;
            _mm512_mask_storeu_ps(gw + j, m, _mm512_fmadd_ps(g, _mm512_maskz_loadu_ps(m, A + q * lda + j), s));
            _mm512_mask_storeu_ps(G + q * h + j, m, _mm512_mul_ps(g, _mm512_maskz_loadu_ps(m, w + j)));
        }
    }
    return rsum;
}

/* ------------------------------------------------------------ AVX2 + FMA */
#define T256 __attribute__((target("avx2,fma")))

T256 static inline __m256i mask8(ptrdiff_t remaining)
{
    const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    const int count = remaining >= 8 ? 8 : (remaining <= 0 ? 0 : (int)remaining);
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(count), lanes);
}

/* Full vectors load and store unmasked: masked stores are slow on some CPUs. */
T256 static inline __m256 load8(const float *p, ptrdiff_t remaining)
{
    return remaining >= 8 ? _mm256_loadu_ps(p) : _mm256_maskload_ps(p, mask8(remaining));
}

T256 static inline void store8(float *p, ptrdiff_t remaining, __m256 v)
{
    if (remaining >= 8)
        _mm256_storeu_ps(p, v);
    else if (remaining > 0)
        _mm256_maskstore_ps(p, mask8(remaining), v);
}

T256 static inline float sum8(__m256 v)
{
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

T256 static float model256(ptrdiff_t n, ptrdiff_t k, ptrdiff_t h, const float *X,
                           const float *A, ptrdiff_t lda, const float *w, float b,
                           const float *y, float *r, float *D, float *G, float *gw)
{
    const __m256 zero = _mm256_setzero_ps();
    float rsum = 0.0f;
    for (ptrdiff_t i = 0; i < n; i += 4) {
        const ptrdiff_t rows = n - i < 4 ? n - i : 4;
        /* Rows past the end are never read; their pointers stay inside X. */
        const float *x0 = X + i * k, *x1 = rows > 1 ? x0 + k : x0;
        const float *x2 = rows > 2 ? x1 + k : x0, *x3 = rows > 3 ? x2 + k : x0;
        __m256 h0 = zero, h1 = zero, h2 = zero, h3 = zero;
        for (ptrdiff_t j = 0; j < h; j += 8) {
            const ptrdiff_t left = h - j;
            __m256 z0 = zero, z1 = zero, z2 = zero, z3 = zero;
            for (ptrdiff_t q = 0; q < k; q++) {
                const __m256 a = load8(A + q * lda + j, left);
                z0 = _mm256_fmadd_ps(_mm256_broadcast_ss(x0 + q), a, z0);
                if (rows > 1) z1 = _mm256_fmadd_ps(_mm256_broadcast_ss(x1 + q), a, z1);
                if (rows > 2) z2 = _mm256_fmadd_ps(_mm256_broadcast_ss(x2 + q), a, z2);
                if (rows > 3) z3 = _mm256_fmadd_ps(_mm256_broadcast_ss(x3 + q), a, z3);
            }
            const __m256 wj = load8(w + j, left);
            h0 = _mm256_fmadd_ps(wj, _mm256_max_ps(zero, z0), h0);
            h1 = _mm256_fmadd_ps(wj, _mm256_max_ps(zero, z1), h1);
            h2 = _mm256_fmadd_ps(wj, _mm256_max_ps(zero, z2), h2);
            h3 = _mm256_fmadd_ps(wj, _mm256_max_ps(zero, z3), h3);
            store8(D + i * h + j, left, z0);
            if (rows > 1) store8(D + (i + 1) * h + j, left, z1);
            if (rows > 2) store8(D + (i + 2) * h + j, left, z2);
            if (rows > 3) store8(D + (i + 3) * h + j, left, z3);
        }
        const __m256 heads[4] = {h0, h1, h2, h3};
        for (ptrdiff_t q = 0; q < rows; q++) {
            const float res = sum8(heads[q]) + b - y[i + q];
            r[i + q] = res;
            rsum += res;
            const __m256 rv = _mm256_set1_ps(res);
            float *row = D + (i + q) * h;
            for (ptrdiff_t j = 0; j < h; j += 8) {
                const __m256 z = load8(row + j, h - j);
                store8(row + j, h - j, _mm256_and_ps(_mm256_cmp_ps(z, zero, _CMP_GT_OQ), rv));
            }
        }
    }
    ptrdiff_t q = 0;
    for (; q + 4 <= k; q += 4) {
        for (ptrdiff_t j = 0; j < h; j += 16) {
            const ptrdiff_t left = h - j;
            __m256 g00 = zero, g01 = zero, g10 = zero, g11 = zero;
            __m256 g20 = zero, g21 = zero, g30 = zero, g31 = zero;
            for (ptrdiff_t i = 0; i < n; i++) {
                const float *d = D + i * h + j, *x = X + i * k + q;
                const __m256 da = load8(d, left), db = load8(d + 8, left - 8);
                __m256 xb = _mm256_broadcast_ss(x);
                g00 = _mm256_fmadd_ps(xb, da, g00); g01 = _mm256_fmadd_ps(xb, db, g01);
                xb = _mm256_broadcast_ss(x + 1);
                g10 = _mm256_fmadd_ps(xb, da, g10); g11 = _mm256_fmadd_ps(xb, db, g11);
                xb = _mm256_broadcast_ss(x + 2);
                g20 = _mm256_fmadd_ps(xb, da, g20); g21 = _mm256_fmadd_ps(xb, db, g21);
                xb = _mm256_broadcast_ss(x + 3);
                g30 = _mm256_fmadd_ps(xb, da, g30); g31 = _mm256_fmadd_ps(xb, db, g31);
            }
            const __m256 e[8] = {g00, g01, g10, g11, g20, g21, g30, g31};
            const __m256 w0 = load8(w + j, left), w1 = load8(w + j + 8, left - 8);
            __m256 s0 = q ? load8(gw + j, left) : zero, s1 = q ? load8(gw + j + 8, left - 8) : zero;
            for (int t = 0; t < 4; t++) {
                const float *a = A + (q + t) * lda + j;
                float *g = G + (q + t) * h + j;
                s0 = _mm256_fmadd_ps(e[2 * t], load8(a, left), s0);
                s1 = _mm256_fmadd_ps(e[2 * t + 1], load8(a + 8, left - 8), s1);
                store8(g, left, _mm256_mul_ps(e[2 * t], w0));
                store8(g + 8, left - 8, _mm256_mul_ps(e[2 * t + 1], w1));
            }
            store8(gw + j, left, s0);
            store8(gw + j + 8, left - 8, s1);
        }
    }
    for (; q < k; q++) {
        for (ptrdiff_t j = 0; j < h; j += 8) {
            __m256 g = zero;
            for (ptrdiff_t i = 0; i < n; i++)
                g = _mm256_fmadd_ps(_mm256_broadcast_ss(X + i * k + q),
                                    load8(D + i * h + j, h - j), g);
            const __m256 s = q ? load8(gw + j, h - j) : zero;
            store8(gw + j, h - j, _mm256_fmadd_ps(g, load8(A + q * lda + j, h - j), s));
            store8(G + q * h + j, h - j, _mm256_mul_ps(g, load8(w + j, h - j)));
        }
    }
    return rsum;
}

/*
 * c models sharing the inputs X (n x k, row-major). Model m's first layer is the
 * k x h matrix at A + m * model_stride with row stride lda, its head W + m * h, its
 * bias b[m] and its labels Y + m * n. Writes the residuals R (c x n), G (c x k x h,
 * contiguous), gw (c x h) and gb (c). D is scratch of (n + k) * h floats. variant
 * is 2 (AVX-512) or 1 (AVX2); the caller checks it with fused_step_variant().
 *
 * Each model's first layer is first copied to contiguous rows at the end of D: in
 * the caller's layout its rows can lie a multiple of 4 KiB apart (with 256 models of
 * 500 units, exactly 125 pages), so that they all compete for the same sets of the
 * L1 cache.
 */
void fused_step(int variant, ptrdiff_t c, ptrdiff_t n, ptrdiff_t k, ptrdiff_t h,
                const float *X, const float *A, ptrdiff_t lda, ptrdiff_t model_stride,
                const float *W, const float *b, const float *Y, float *R, float *D,
                float *G, float *gw, float *gb)
{
    float *Am = D + n * h;
    for (ptrdiff_t m = 0; m < c; m++) {
        for (ptrdiff_t q = 0; q < k; q++)
            memcpy(Am + q * h, A + m * model_stride + q * lda, (size_t)h * sizeof(float));
        if (variant == 2)
            gb[m] = model512(n, k, h, X, Am, h, W + m * h, b[m], Y + m * n, R + m * n, D,
                             G + m * k * h, gw + m * h);
        else
            gb[m] = model256(n, k, h, X, Am, h, W + m * h, b[m], Y + m * n, R + m * n, D,
                             G + m * k * h, gw + m * h);
    }
}

#else   /* not x86-64 with GCC or Clang: no fused kernel, the trainer uses BLAS */

int fused_step_variant(void) { return 0; }

void fused_step(int variant, ptrdiff_t c, ptrdiff_t n, ptrdiff_t k, ptrdiff_t h,
                const float *X, const float *A, ptrdiff_t lda, ptrdiff_t model_stride,
                const float *W, const float *b, const float *Y, float *R, float *D,
                float *G, float *gw, float *gb)
{
    (void)variant; (void)c; (void)n; (void)k; (void)h; (void)X; (void)A; (void)lda;
    (void)model_stride; (void)W; (void)b; (void)Y; (void)R; (void)D; (void)G;
    (void)gw; (void)gb;
}

#endif
