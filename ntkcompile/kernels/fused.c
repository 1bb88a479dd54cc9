/* Fused elementwise rules of ntkcompile (kernels/fused.py builds and loads this file).
 *
 * One pass over the pair arrays per rule, in blocks of BLOCK entries that stay in L1,
 * instead of a dozen torch ops each reading and writing whole arrays.  Every rule
 * takes the same operations in the same order as its torch form in ops/activations.py
 * and kernels/quadrature.py (compiled with -ffp-contract=off), with a correctly rounded
 * sqrt and SLEEF's arccos (3.5 ulp; torch's is SLEEF's 1-ulp one), so the two paths agree
 * to a few ulps.
 *
 * Arrays are up to three broadcast dimensions (d0, d1, d2); each input has its own
 * element strides (0 for a broadcast dimension); outputs are contiguous.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#define BLOCK 256
#define PI 3.141592653589793
#define INV_2PI (1.0 / (2.0 * PI))      /* folded at compile time, as INV_2PI in ops/elementwise.py */

#include "simd.h"

typedef vec (*vec_fn)(vec);
static vec_fn sleef_acos = 0;

/* The SIMD width this file was built for, so the loader hands over the matching SLEEF
 * routine (Sleef_acosd8_u35, Sleef_acosd4_u35) or none (then libm's acos). */
int ntk_width(void) { return WIDTH; }

/* arccos: the SLEEF routine of this width found in libtorch, else (NULL) libm's. */
void ntk_init(void *sleef) { sleef_acos = (vec_fn)sleef; }

static void acos_block(const double *c, double *out, int64_t n) {
    int64_t i = 0;
    if (sleef_acos && WIDTH > 1) {
        vec v;
        for (; i + WIDTH <= n; i += WIDTH) {
            memcpy(&v, c + i, sizeof v);
            v = sleef_acos(v);
            memcpy(out + i, &v, sizeof v);
        }
        if (i < n) {                       /* the tail through the same routine */
            double tmp[WIDTH] = {0};
            memcpy(tmp, c + i, (size_t)(n - i) * sizeof(double));
            memcpy(&v, tmp, sizeof v);
            v = sleef_acos(v);
            memcpy(tmp, &v, sizeof v);
            memcpy(out + i, tmp, (size_t)(n - i) * sizeof(double));
        }
        return;
    }
    for (; i < n; i++) out[i] = acos(c[i]);
}

/* ``c = k12 / sqrt(k11 k22)`` clamped to [-1, 1], 0 where the product is 0, as
 * quadrature.correlation: sqrt(k11 k22) when the product is in float64's comfortable
 * range, else sqrt(k11) sqrt(k22).  NaN propagates as there. */
static inline double correlation(double k11, double k12, double k22, double *scale) {
    double v1 = k11 < 0.0 ? 0.0 : k11, v2 = k22 < 0.0 ? 0.0 : k22;
    double p = v1 * v2;
    double s = (p > 1e-290 && p < 1e290) ? sqrt(p) : sqrt(v1) * sqrt(v2);
    *scale = s;
    if (!(s > 0.0)) return 0.0;
    double c = k12 / s;
    return c < -1.0 ? -1.0 : (c > 1.0 ? 1.0 : c);
}

/* ``sqrt(k11 k22) (sqrt(1 - c^2) + (pi - theta) c) / (2 pi)``: the arc-cosine kernel
 * (ops/activations._relu_kernel: sqrt(1 - c^2) and theta come from the same c). */
static inline double relu_kernel(double scale, double c, double theta) {
    double out = 1.0 - c * c;
    out = sqrt(out < 0.0 ? 0.0 : out);
    out = out + (PI - theta) * c;
    return out * scale * INV_2PI;
}

#if defined(__AVX512F__)
#include <immintrin.h>
/* Square roots and quotients without the divider, 8 lanes at a time (the divider, shared by
 * vsqrtpd and vdivpd, took about half of a closed-form program's time): rsqrt14's 14-bit
 * estimate of 1/sqrt(p), two Newton steps (about 2^-52), then one correction from the exact
 * residual (an FMA) each, ``s + (p - s^2) y / 2`` and ``q + (a - s q) y``, which round as
 * sqrt and division do except within about 2^-100 relative of a rounding boundary (see
 * ntk_roots, which tests/kernels/test_fused.py compares with numpy's IEEE sqrt and division
 * bit for bit).  Lanes
 * need ``p`` positive and normal; the callers guarantee it or blend those lanes out. */
static inline __m512d rsqrt8(__m512d p) {
    const __m512d half = _mm512_set1_pd(0.5);
    __m512d y = _mm512_rsqrt14_pd(p), h = _mm512_mul_pd(p, half);
    for (int k = 0; k < 2; k++)     /* y (1 + (1 - p y^2) / 2) */
        y = _mm512_fmadd_pd(y, _mm512_fnmadd_pd(h, _mm512_mul_pd(y, y), half), y);
    return y;
}

static inline __m512d sqrt8(__m512d p, __m512d y) {       /* y: rsqrt8(p) */
    __m512d s = _mm512_mul_pd(p, y);
    return _mm512_fmadd_pd(_mm512_fnmadd_pd(s, s, p), _mm512_mul_pd(y, _mm512_set1_pd(0.5)), s);
}

static inline __m512d quot8(__m512d a, __m512d s, __m512d y) {     /* a / s, y about 1 / s */
    __m512d q = _mm512_mul_pd(a, y);
    return _mm512_fmadd_pd(_mm512_fnmadd_pd(s, q, a), y, q);
}

/* ``sqrt(max(x, 0))``, NaN kept: 0 (and NaN) lanes bypass the estimate (rsqrt14(0) = inf). */
static inline __m512d sqrt8_nonneg(__m512d x) {
    x = _mm512_max_pd(_mm512_setzero_pd(), x);                  /* the second operand when NaN */
    __mmask8 pos = _mm512_cmp_pd_mask(x, _mm512_setzero_pd(), _CMP_GT_OQ);
    return _mm512_mask_blend_pd(pos, x, sqrt8(x, rsqrt8(x)));
}

/* relu_kernel of 8 lanes, in its operations' order. */
static inline __m512d relu_kernel8(__m512d scale, __m512d c, __m512d theta) {
    __m512d out = _mm512_sub_pd(_mm512_set1_pd(1.0), _mm512_mul_pd(c, c));
    out = _mm512_add_pd(sqrt8_nonneg(out), _mm512_mul_pd(_mm512_sub_pd(_mm512_set1_pd(PI), theta), c));
    return _mm512_mul_pd(_mm512_mul_pd(out, scale), _mm512_set1_pd(INV_2PI));
}

/* Test hook: ``s = sqrt(p)``, ``q = a / s`` (p positive normal) and ``r = sqrt(max(x, 0))``
 * through the routines above, lanes of 8 (the rest as libm does). */
int ntk_roots(const double *p, const double *a, const double *x, double *s, double *q, double *r, int64_t n) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m512d pv = _mm512_loadu_pd(p + i), y = rsqrt8(pv), sv = sqrt8(pv, y);
        _mm512_storeu_pd(s + i, sv);
        _mm512_storeu_pd(q + i, quot8(_mm512_loadu_pd(a + i), sv, y));
        _mm512_storeu_pd(r + i, sqrt8_nonneg(_mm512_loadu_pd(x + i)));
    }
    for (; i < n; i++) {
        s[i] = sqrt(p[i]);
        q[i] = a[i] / s[i];
        r[i] = sqrt(x[i] < 0.0 ? 0.0 : x[i]);
    }
    return 1;
}
#else
int ntk_roots(const double *p, const double *a, const double *x, double *s, double *q, double *r, int64_t n) {
    (void)p; (void)a; (void)x; (void)s; (void)q; (void)r; (void)n;
    return 0;                                  /* no divider-free path in this build */
}
#endif

/* ``aa R(c) + ab2 R(-c)``: R at theta and at pi - theta (the relu family's V-transform). */
static void relu_cs(const double *c, const double *s, const double *th, double *out, const double *par,
                    int64_t n) {
    double aa = par[0], ab2 = par[1];
    int64_t i = 0;
#if defined(__AVX512F__)
    __m512d va = _mm512_set1_pd(aa), vb = _mm512_set1_pd(ab2), pi = _mm512_set1_pd(PI);
    for (; i + 8 <= n; i += 8) {
        __m512d cv = _mm512_loadu_pd(c + i), sv = _mm512_loadu_pd(s + i), tv = _mm512_loadu_pd(th + i);
        __m512d v = _mm512_mul_pd(va, relu_kernel8(sv, cv, tv));
        if (ab2 != 0.0) {
            __m512d neg = _mm512_mul_pd(cv, _mm512_set1_pd(-1.0));     /* -c, -0.0 included */
            v = _mm512_add_pd(v, _mm512_mul_pd(vb, relu_kernel8(sv, neg, _mm512_sub_pd(pi, tv))));
        }
        _mm512_storeu_pd(out + i, v);
    }
#endif
    if (ab2 == 0.0) {
        for (; i < n; i++) out[i] = aa * relu_kernel(s[i], c[i], th[i]);
    } else {
        for (; i < n; i++)
            out[i] = aa * relu_kernel(s[i], c[i], th[i]) + ab2 * relu_kernel(s[i], -c[i], PI - th[i]);
    }
}

/* Variances for which the one-branch correlation is exact: both positive, product ``p``
 * neither tiny nor huge (in_range; the vector loop of correlation_block tests the same). */
static inline int lane_in_range(double k11, double k22, double p) {
    return (k11 > 0.0) & (k22 > 0.0) & (p > 1e-290) & (p < 1e290);
}

/* ``c = k12 / s`` clamped to [-1, 1] and the scale ``s = sqrt(k11 k22)``: the correlation's
 * one-branch form, for variances in range.  Returns in_range(k11, k22, n), found on the way
 * (the values are only meant for blocks where it holds). */
static int correlation_block(const double *k11, const double *k12, const double *k22, double *c, double *s,
                             int64_t n) {
    int64_t i = 0;
    int ok = 1;
#if defined(__AVX512F__)
    const __m512d lo = _mm512_set1_pd(-1.0), hi = _mm512_set1_pd(1.0), zero = _mm512_setzero_pd();
    const __m512d tiny = _mm512_set1_pd(1e-290), huge = _mm512_set1_pd(1e290);
    __mmask8 fine = 0xff;
    for (; i + 8 <= n; i += 8) {
        __m512d a = _mm512_loadu_pd(k11 + i), b = _mm512_loadu_pd(k22 + i), p = _mm512_mul_pd(a, b);
        fine &= _mm512_cmp_pd_mask(a, zero, _CMP_GT_OQ) & _mm512_cmp_pd_mask(b, zero, _CMP_GT_OQ)
                & _mm512_cmp_pd_mask(p, tiny, _CMP_GT_OQ) & _mm512_cmp_pd_mask(p, huge, _CMP_LT_OQ);
        __m512d y = rsqrt8(p), sv = sqrt8(p, y), v = quot8(_mm512_loadu_pd(k12 + i), sv, y);
        _mm512_storeu_pd(s + i, sv);
        _mm512_storeu_pd(c + i, _mm512_min_pd(hi, _mm512_max_pd(lo, v)));   /* NaN kept (second operand) */
    }
    ok = fine == 0xff;
#endif
    for (; i < n; i++) {
        double p = k11[i] * k22[i];
        ok &= lane_in_range(k11[i], k22[i], p);
        s[i] = sqrt(p);
        double v = k12[i] / s[i];
        c[i] = v < -1.0 ? -1.0 : (v > 1.0 ? 1.0 : v);
    }
    return ok;
}

/* ------------------------------------------------------------------ rules */

enum { RULE_ANGLE = 0, RULE_RELU = 1, RULE_STEP = 2 };

/* Whether every ``k11 k22`` of the block (variances clamped at 0) is in (1e-290, 1e290),
 * where the correlation and the arc-cosine root take their one-branch forms. */
static int in_range(const double *k11, const double *k22, int64_t n) {
    int ok = 1;
    for (int64_t i = 0; i < n; i++) ok &= lane_in_range(k11[i], k22[i], k11[i] * k22[i]);
    return ok;
}

/* ``aa S(c) + ab2 S(-c)``, S = (pi - theta) / (2 pi): the step rule of one block. */
static void step_block(const double *th, double *out, int64_t n, const double *par) {
    double aa = par[0], ab2 = par[1];
    for (int64_t i = 0; i < n; i++) {
        double v = (PI - th[i]) * INV_2PI;
        if (aa != 1.0) v = aa * v;
        if (ab2 != 0.0) v = v + ab2 * ((PI - (PI - th[i])) * INV_2PI);
        out[i] = v;
    }
}

/* One block of ``n`` entries: in[r] are the inputs, contiguous in the block, ``k11`` and
 * ``k22`` first and last of three (the step rule's middle one is theta).  Each rule has a
 * branch-free loop (vectorized) for blocks whose variances are all in range, and the
 * general per-entry form otherwise; both give the same values there.  Returns whether the
 * block was in range (so every variance positive). */
static int rule_block(int rule, const double *const *in, double *out, int64_t n, const double *par,
                       double *tmp) {
    const double *k11 = in[0], *k12 = in[1], *k22 = in[2];
    if (rule == RULE_STEP) {               /* aa S(c) + ab2 S(-c): theta alone (in[1]) */
        step_block(in[1], out, n, par);
        return in_range(k11, k22, n);
    }
    double s, *scale = tmp + BLOCK;        /* the fast form, which finds whether it applies */
    int fast = correlation_block(k11, k12, k22, tmp, scale, n);
    if (!fast) {
        for (int64_t i = 0; i < n; i++) {
            tmp[i] = correlation(k11[i], k12[i], k22[i], &s);
            scale[i] = s;
        }
    }
    if (rule == RULE_ANGLE)                /* arccos c */
        acos_block(tmp, out, n);
    else                                   /* aa R(c) + ab2 R(-c), R at theta and pi - theta */
        relu_cs(tmp, scale, in[3], out, par, n);
    return fast;
}

/* Apply ``rule`` to the entries ``[lo, hi)`` (row-major) of a (d0, d1, d2) array.  ``in[r]``
 * has strides ``st[3 r .. 3 r + 2]`` (elements); ``out`` is contiguous.  Returns 1 when
 * every variance was positive and in range, 0 otherwise, -1 for an unknown rule. */
int ntk_rule(int rule, int n_in, const double *const *in, const int64_t *st, const int64_t *shape,
             double *out, const double *par, int64_t lo, int64_t hi) {
    if (rule < RULE_ANGLE || rule > RULE_STEP || n_in < 3 || n_in > 4) return -1;
    int positive = 1;
    double buf[4][BLOCK], tmp[2 * BLOCK];
    const double *rows[4];
    int64_t d1 = shape[1], d2 = shape[2];
    while (lo < hi) {
        int64_t j = lo % d2, i1 = (lo / d2) % d1, i0 = lo / (d1 * d2);
        int64_t n = d2 - j;
        if (n > BLOCK) n = BLOCK;
        if (n > hi - lo) n = hi - lo;
        for (int r = 0; r < n_in; r++) {
            const double *p = in[r] + i0 * st[3 * r] + i1 * st[3 * r + 1];
            int64_t s = st[3 * r + 2];
            if (s == 1) {
                rows[r] = p + j;
            } else {
                for (int64_t i = 0; i < n; i++) buf[r][i] = p[(j + i) * s];
                rows[r] = buf[r];
            }
        }
        positive &= rule_block(rule, rows, out + lo, n, par, tmp);
        lo += n;
    }
    return positive;
}

/* ------------------------------------------------------------------ window sums on pairs
 *
 * ``out[b, p, q] = (sum over taps t of in[b, tab[t, p], tab[t, q]]) / size``, a tap
 * contributing only where both entries of ``tab`` are >= 0 (-1: zero padding).  With the
 * table of a convolution's windows this is kernels.spatial.stencil_pair; with the table of
 * output positions reading each input position it is its adjoint.  Taps are added in
 * order from 0, as the torch forms add their shifted views.  Rows ``b`` in [lo, hi).
 *
 * ``runs`` (or NULL) lists, tap by tap, the stretches where ``tab[t, q]`` is ``s0 + q - q0``
 * or -1: ``(q0, s0, length, masked)``, those of tap t at ``runs[4 run_at[t] ...]`` up to
 * ``run_at[t + 1]``; ``masked``: the stretch has -1 entries (zero padding between rows),
 * which add nothing.  A stride-1 window then adds a few long slices (vector loads, masked
 * across padding) instead of gathering entry by entry or adding row-sized pieces. */
void ntk_window_pair(const double *in, double *out, int64_t n_in, int64_t n_out, int taps,
                     const int32_t *tab, const int32_t *runs, const int32_t *run_at, double size,
                     int64_t lo, int64_t hi) {
    for (int64_t b = lo; b < hi; b++) {
        const double *src = in + b * n_in * n_in;
        for (int64_t p = 0; p < n_out; p++) {
            double *row = out + (b * n_out + p) * n_out;
            for (int64_t q = 0; q < n_out; q++) row[q] = 0.0;
            for (int t = 0; t < taps; t++) {
                const int32_t *tt = tab + (int64_t)t * n_out;
                if (tt[p] < 0) continue;
                const double *line = src + (int64_t)tt[p] * n_in;
                if (runs) {
                    for (int32_t r = run_at[t]; r < run_at[t + 1]; r++) {
                        const int32_t *run = runs + 4 * r, *restrict m = tt + run[0];
                        double *restrict o = row + run[0];
                        const double *restrict l = line + run[1];
                        if (run[3]) {
                            for (int32_t i = 0, n = run[2]; i < n; i++) o[i] = m[i] >= 0 ? o[i] + l[i] : o[i];
                        } else {
                            for (int32_t i = 0, n = run[2]; i < n; i++) o[i] += l[i];
                        }
                    }
                } else {
                    for (int64_t q = 0; q < n_out; q++)
                        if (tt[q] >= 0) row[q] += line[tt[q]];
                }
            }
            for (int64_t q = 0; q < n_out; q++) row[q] = row[q] / size;
        }
    }
}

/* ntk_window_pair for tables of one shift per tap (stride-1 windows): ``tab[t, q]`` is
 * ``q + shift[t]`` or -1, and ``mask[t, q]`` is all bits set where it is not -1, else 0.
 * Stretches of SPAN entries of a row add their taps in registers, in order from tap 0,
 * a masked-out lane adding +0.0 as the torch form's zero padding does; a stretch whose
 * (unused) entries would lie outside row b's array is read entry by entry.  Same values as
 * ntk_window_pair, without a row store per tap. */
#define SPAN (4 * WIDTH)
void ntk_window_pair_shift(const double *in, double *out, int64_t n_in, int64_t n_out, int taps,
                           const int32_t *tab, const int32_t *shift, const int64_t *mask, double size,
                           int64_t lo, int64_t hi) {
    const double *line[taps];
    const int64_t *keep[taps];
    for (int64_t b = lo; b < hi; b++) {
        const double *src = in + b * n_in * n_in, *end = src + n_in * n_in;
        for (int64_t p = 0; p < n_out; p++) {
            int na = 0;
            for (int t = 0; t < taps; t++) {
                int32_t s = tab[(int64_t)t * n_out + p];
                if (s < 0) continue;
                line[na] = src + (int64_t)s * n_in + shift[t];
                keep[na++] = mask + (int64_t)t * n_out;
            }
            double *row = out + (b * n_out + p) * n_out;
            int64_t q = 0;
#if WIDTH > 1
            typedef int64_t bits __attribute__((vector_size(sizeof(vec))));
            vec by;
            for (int i = 0; i < WIDTH; i++) by[i] = size;
            for (; q + SPAN <= n_out; q += SPAN) {   /* SPAN / WIDTH independent sums per tap */
                vec acc[SPAN / WIDTH] = {{0}}, v;
                bits m;
                for (int k = 0; k < na; k++) {
                    const double *l = line[k] + q;
                    if (l >= src && l + SPAN <= end) {
                        for (int u = 0; u < SPAN / WIDTH; u++) {
                            memcpy(&v, l + u * WIDTH, sizeof v);
                            memcpy(&m, keep[k] + q + u * WIDTH, sizeof m);
                            acc[u] += (vec)((bits)v & m);
                        }
                    } else {
                        double one[SPAN];
                        for (int i = 0; i < SPAN; i++) one[i] = keep[k][q + i] ? l[i] : 0.0;
                        for (int u = 0; u < SPAN / WIDTH; u++) {
                            memcpy(&v, one + u * WIDTH, sizeof v);
                            acc[u] += v;
                        }
                    }
                }
                for (int u = 0; u < SPAN / WIDTH; u++) {
                    v = acc[u] / by;
                    memcpy(row + q + u * WIDTH, &v, sizeof v);
                }
            }
#endif
            for (; q < n_out; q++) {
                double acc = 0.0;
                for (int k = 0; k < na; k++) acc += keep[k][q] ? line[k][q] : 0.0;
                row[q] = acc / size;
            }
        }
    }
}

/* ``out[b, p] = (sum over taps t of in[b, tab[t, p]]) / size``, 0 for a tap's -1 (zero
 * padding): kernels.spatial.stencil_same, the window mean of one input's variances over its
 * positions.  Each tap adds in order from tap 0, a padded one adding 0.0, as the torch
 * form's sum of shifted views of the padded array.  Rows ``b`` in [lo, hi). */
void ntk_window_same(const double *in, double *out, int64_t n_in, int64_t n_out, int taps, const int32_t *tab,
                     double size, int64_t lo, int64_t hi) {
    for (int64_t b = lo; b < hi; b++) {
        const double *src = in + b * n_in;
        for (int64_t p = 0; p < n_out; p++) {
            double acc = 0.0;
            for (int t = 0; t < taps; t++) {
                int32_t q = tab[(int64_t)t * n_out + p];
                double v = q >= 0 ? src[q] : 0.0;
                acc = t == 0 ? v : acc + v;
            }
            out[b * n_out + p] = acc / size;
        }
    }
}

/* ------------------------------------------------------------------ the packed pair layout
 *
 * ``out[t, :] = src[a[t] * stride + (b ? b[t] : 0), :]`` for rows of ``row`` doubles: a
 * per-input array lifted to the packed pairs (``x[I]``), or a full ``(N, N, ...)`` array
 * packed (``full[I, J]``).  Pairs ``t`` in [lo, hi). */
void ntk_gather(const double *src, int64_t row, const int64_t *a, const int64_t *b, int64_t stride,
                double *out, int64_t lo, int64_t hi) {
    if (row == 1) {
        if (b) {
            for (int64_t t = lo; t < hi; t++) out[t] = src[a[t] * stride + b[t]];
        } else {
            for (int64_t t = lo; t < hi; t++) out[t] = src[a[t] * stride];
        }
        return;
    }
    for (int64_t t = lo; t < hi; t++)
        memcpy(out + t * row, src + (a[t] * stride + (b ? b[t] : 0)) * row, (size_t)row * sizeof(double));
}

/* The symmetric ``(n, n)`` matrix of packed pairs ``(i[t], j[t])``, ``t`` in [lo, hi). */
void ntk_unpack(const double *packed, const int64_t *i, const int64_t *j, int64_t n, double *out,
                int64_t lo, int64_t hi) {
    for (int64_t t = lo; t < hi; t++) {
        out[i[t] * n + j[t]] = packed[t];
        out[j[t] * n + i[t]] = packed[t];
    }
}

/* ------------------------------------------------------------------ programs
 *
 * A straight-line program over registers of BLOCK doubles (kernels/program.py writes it):
 * a chain of elementwise steps of the plan (arithmetic, the rules above, the loads of pair
 * and lifted per-input arrays) run block by block over the entries [lo, hi), so that its
 * intermediate arrays never leave L1.  Each instruction is PROG_WIDTH int32s:
 *
 *   LOAD   dst leaf           leaf ``leaf``: its entries at this block (strided, or gathered
 *                             through its index array when it has one; a row-major leaf, or
 *                             a block within one row of unit stride, is read in place, the
 *                             register pointing into it; blocks stop at the end of rows of
 *                             2 BLOCK or more, so that most do)
 *   CONST  dst k              the constant consts[k] (run once, before the blocks)
 *   ADD    dst a [b c d e]    ((a + b) + c) + ...: 1 to 5 registers, -1 past the last
 *   MUL    dst a [b c d e]    ((a * b) * c) * ... (one pass for a chain: dst may be a)
 *   ANGLE  dst k11 k12 k22    as RULE_ANGLE
 *   RELU   dst k11 k12 k22 th p   as RULE_RELU with parameters consts[p], consts[p + 1]
 *   STEP   dst k11 th k22 - p as RULE_STEP
 *   STORE  out src            output ``out`` (contiguous) takes the register
 *
 *   ANGLE_CS dst k11 k12 k22 c s   ANGLE, keeping the correlation and the scale sqrt(k11 k22)
 *   RELU_CS  dst c s th - p        RELU from them (a relu at the angle of its own variances)
 *   SUM    out src g          output ``out`` (zeroed by the caller) adds the register's entries,
 *                             entry e into out[e / g] (a sum over the trailing position axes;
 *                             the caller splits [lo, hi) at multiples of g between threads)
 *
 * Leaves share one shape of ``ndim`` <= PROG_MAX_DIMS dimensions, each with its own strides
 * (0 where it is broadcast); a leaf with an index array reads leaf[index[e]] (flat shapes
 * only, ndim = 1).  Returns 1, or 0 as soon as a rule meets a variance that is not positive
 * and in range (the caller then runs the program's torch form, which pins zero variances),
 * -1 for a bad instruction. */

#define PROG_WIDTH 7
#define PROG_MAX_DIMS 8
enum { OP_LOAD = 0, OP_CONST, OP_ADD, OP_MUL, OP_ANGLE, OP_RELU, OP_STEP, OP_STORE, OP_ANGLE_CS, OP_RELU_CS,
       OP_SUM };

/* The angle with its correlation and scale, each as rule_block's fast path (the only one a
 * program takes): RELU_CS then computes the same values as RELU would. */
static int angle_cs(const double *k11, const double *k12, const double *k22, double *th, double *c,
                    double *s, int64_t n) {
    if (!correlation_block(k11, k12, k22, c, s, n)) return 0;
    acos_block(c, th, n);
    return 1;
}

/* ``dst = ((o0 op o1) op o2) op ...`` over ``m`` (1 to 5) operands, in that order (as the
 * binary steps it replaces: same roundings), in one pass; ``dst`` may be o0. */
#define CHAIN(OP) do {                                                                            \
    const double *a = o[0], *b = o[m > 1 ? 1 : 0], *c2 = o[m > 2 ? 2 : 0];                    \
    const double *d = o[m > 3 ? 3 : 0], *e = o[m > 4 ? 4 : 0];                                  \
    if (m == 1) for (int64_t i = 0; i < n; i++) dst[i] = a[i];                                  \
    else if (m == 2) for (int64_t i = 0; i < n; i++) dst[i] = a[i] OP b[i];                     \
    else if (m == 3) for (int64_t i = 0; i < n; i++) dst[i] = (a[i] OP b[i]) OP c2[i];          \
    else if (m == 4) for (int64_t i = 0; i < n; i++) dst[i] = ((a[i] OP b[i]) OP c2[i]) OP d[i]; \
    else for (int64_t i = 0; i < n; i++) dst[i] = (((a[i] OP b[i]) OP c2[i]) OP d[i]) OP e[i];   \
} while (0)
static void chain(int mul, int m, const double *const *o, double *dst, int64_t n) {
    if (mul) CHAIN(*);
    else CHAIN(+);
}
#undef CHAIN

/* The sum of ``n`` entries: WIDTH running sums (vectorized), then added up. */
static double block_sum(const double *r, int64_t n) {
    int64_t i = 0;
    double total = 0.0;
#if WIDTH > 1
    vec acc = {0}, v;
    for (; i + WIDTH <= n; i += WIDTH) {
        memcpy(&v, r + i, sizeof v);
        acc += v;
    }
    for (int k = 0; k < WIDTH; k++) total += acc[k];
#endif
    for (; i < n; i++) total += r[i];
    return total;
}

int ntk_program(const int32_t *code, int n_code, const double *consts, const double *const *leaves,
                const int64_t *leaf_strides, const int64_t *const *index, double *const *outs,
                int ndim, const int64_t *shape, double *regs, int64_t lo, int64_t hi, int n_regs) {
    double tmp[2 * BLOCK];
    int64_t inner = shape[ndim - 1], at[PROG_MAX_DIMS];
    const double *reg[n_regs];                 /* what each register reads: its own BLOCK, or a leaf's */
    for (int r = 0; r < n_regs; r++) reg[r] = regs + (int64_t)r * BLOCK;
    for (int k = 0; k < n_code; k++) {
        const int32_t *c = code + k * PROG_WIDTH;
        if (c[0] == OP_CONST)
            for (int i = 0; i < BLOCK; i++) regs[(int64_t)c[1] * BLOCK + i] = consts[c[2]];
    }
    while (lo < hi) {
        int64_t rest = lo / inner, j0 = lo % inner;
        for (int d = ndim - 2; d >= 0; d--) {      /* the outer index of entry lo */
            at[d] = rest % shape[d];
            rest /= shape[d];
        }
        int64_t n = hi - lo < BLOCK ? hi - lo : BLOCK;  /* a block may span rows... */
        if (inner >= 2 * BLOCK && j0 + n > inner) n = inner - j0;   /* ...unless they are long */
        int angle_k11 = -1, angle_k22 = -1;       /* the variances ANGLE_CS found in range */
        for (int k = 0; k < n_code; k++) {
            const int32_t *c = code + k * PROG_WIDTH;
            double *dst = regs + (int64_t)c[1] * BLOCK;
#define R(x) reg[x]
            if (c[0] != OP_STORE && c[0] != OP_SUM) {
                reg[c[1]] = dst;                   /* ops write their own BLOCK */
                if (c[1] == angle_k11 || c[1] == angle_k22) angle_k11 = angle_k22 = -1;   /* a new value */
            }
            switch (c[0]) {
            case OP_LOAD: {
                const int64_t *st = leaf_strides + (int64_t)ndim * c[2], s = st[ndim - 1];
                const double *base = leaves[c[2]];
                if (index[c[2]]) {
                    const int64_t *ix = index[c[2]] + lo;
                    for (int64_t i = 0; i < n; i++) dst[i] = base[ix[i] * s];
                    break;
                }
                int flat = s == 1;                 /* row-major in the program's shape: read in place */
                for (int d = ndim - 2; d >= 0 && flat; d--) flat = st[d] == st[d + 1] * shape[d + 1];
                if (flat || (s == 1 && j0 + n <= inner)) {      /* or the block within one row */
                    const double *p = base + j0;
                    for (int d = 0; d < ndim - 1; d++) p += at[d] * st[d];
                    reg[c[1]] = flat ? base + lo : p;
                    break;
                }
                int64_t a[PROG_MAX_DIMS], j = j0, done = 0;
                memcpy(a, at, sizeof a);
                while (done < n) {                 /* row by row: the rest of a row, or of the block */
                    int64_t m = inner - j < n - done ? inner - j : n - done;
                    const double *p = base + j * s;
                    for (int d = 0; d < ndim - 1; d++) p += a[d] * st[d];
                    double *o = dst + done;
                    if (s == 1) memcpy(o, p, (size_t)m * sizeof(double));
                    else if (s == 0) for (int64_t i = 0; i < m; i++) o[i] = p[0];
                    else for (int64_t i = 0; i < m; i++) o[i] = p[i * s];
                    done += m;
                    j = 0;
                    for (int d = ndim - 2; d >= 0 && ++a[d] == shape[d]; d--) a[d] = 0;
                }
                break;
            }
            case OP_CONST: break;
            case OP_ADD: case OP_MUL: {
                const double *o[5];
                int m = 0;
                while (m < 5 && c[2 + m] >= 0) { o[m] = R(c[2 + m]); m++; }
                if (m < 1) return -1;
                chain(c[0] == OP_MUL, m, o, dst, n);
                break;
            }
            case OP_STEP:
                if (c[2] == angle_k11 && c[4] == angle_k22) {      /* variances checked: no second pass */
                    step_block(R(c[3]), dst, n, consts + c[6]);
                    break;
                }
                /* fall through */
            case OP_ANGLE: case OP_RELU: {
                const double *in[4] = {R(c[2]), R(c[3]), R(c[4]), c[0] == OP_RELU ? R(c[5]) : 0};
                int rule = c[0] == OP_ANGLE ? RULE_ANGLE : (c[0] == OP_RELU ? RULE_RELU : RULE_STEP);
                const double *par = consts + c[6];
                if (!rule_block(rule, in, dst, n, par, tmp)) return 0;
                break;
            }
            case OP_ANGLE_CS: {                    /* (c[5], c[6] are new registers, not k11, k22) */
                double *cor = regs + (int64_t)c[5] * BLOCK, *scale = regs + (int64_t)c[6] * BLOCK;
                reg[c[5]] = cor;
                reg[c[6]] = scale;
                if (!angle_cs(R(c[2]), R(c[3]), R(c[4]), dst, cor, scale, n)) return 0;
                angle_k11 = c[2];
                angle_k22 = c[4];
                break;
            }
            case OP_RELU_CS: relu_cs(R(c[2]), R(c[3]), R(c[4]), dst, consts + c[6], n); break;
            case OP_SUM: {
                const double *r = R(c[2]);
                double *o = outs[c[1]];
                int64_t g = c[3];
                for (int64_t i = 0; i < n;) {
                    int64_t row = (lo + i) / g, end = (row + 1) * g - lo;
                    if (end > n) end = n;
                    o[row] += block_sum(r + i, end - i);
                    i = end;
                }
                break;
            }
            case OP_STORE: {
                double *o = outs[c[1]] + lo;
                memcpy(o, R(c[2]), (size_t)n * sizeof(double));
                break;
            }
            default: return -1;
            }
#undef R
        }
        lo += n;
    }
    return 1;
}
