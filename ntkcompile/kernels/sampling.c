/* Quasi-Monte Carlo of an N-D expectation as one pass (kernels/pointwise.py writes the
 * program, kernels/qmc.py calls it; built into the same library as fused.c).
 *
 * qmc.expect_blocks evaluates E f(z) per entry of a batch: z = factor @ eps on each entry's
 * net of points, then f as a chain of torch ops over (points, entries) arrays.  Building z
 * (a gather of each position's net, a multiply-add per factor term) and the chain of ops
 * each read and write whole arrays: 24 ns per entry, point and call on a 3-block ResNet v1.
 * Here one entry at a time, BLOCK points at a time, z and the integrand stay in L1: either
 * a compiled body (kernels/native.py: the program as one C loop, values in registers, its
 * sums added in the loop; run_body) or this file's interpreter of the program (ntk_qmc).
 *
 * The interpreter takes the same operations in the same order as the torch form (compiled
 * with -ffp-contract=off): z_slot = ((0 + c_0 eps_0) + c_1 eps_1) + ..., then the program's
 * steps, so every value of f agrees with it to the last bit; only the sums over points add
 * in another order (and a compiled body's sums in yet another).
 *
 * Program: instructions of QMC_WIDTH int32s over registers of BLOCK doubles; registers
 * 0 .. n_slots - 1 hold the slots.
 *
 *   CONST  dst k        consts[k] (filled once, before the entries)
 *   ADD    dst a b      a + b
 *   MUL    dst a b      a * b
 *   PW     dst a - p    the piecewise polynomial at consts[p]: m breaks, c coefficients per
 *                       piece, then the breaks t_1 < ... < t_m, the values at them, and the
 *                       m + 1 pieces' coefficients (lowest first), as kernels.piecewise
 *   PWADD  dst a b p    PW of a + b, for one break and pieces of degree <= 1 (relu(z + h))
 *   OUT    j a          output j takes the register
 *   OUTMUL j a b        output j takes a * b
 *
 * Per entry: each output's mean, and the standard error of the mean (as for independent
 * points) of output 0, or with a compiled body of the outputs the caller asks it for.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#define BLOCK 256
#define QMC_WIDTH 5
#define QMC_MAX_OUT 32           /* pointwise.MAX_OUTPUTS */
enum { Q_CONST = 0, Q_ADD, Q_MUL, Q_PW, Q_OUT, Q_PWADD, Q_OUTMUL };

#include "simd.h"

/* One piece ``p`` (``c`` coefficients, by Horner) of x[0..n): into dst (piece 0), else where
 * x > t.  The common degrees 0 and 1 in loops of their own, which the compiler vectorizes. */
static void piece(const double *p, int c, const double *restrict x, double *restrict dst, int64_t n, int first,
                  double t) {
    const double p0 = p[0], p1 = c > 1 ? p[1] : 0.0;    /* locals: dst cannot alias them */
    if (c == 1 && first) for (int64_t i = 0; i < n; i++) dst[i] = p0;
    else if (c == 1) for (int64_t i = 0; i < n; i++) dst[i] = x[i] > t ? p0 : dst[i];
    else if (c == 2 && first) for (int64_t i = 0; i < n; i++) dst[i] = p1 * x[i] + p0;
    else if (c == 2) for (int64_t i = 0; i < n; i++) dst[i] = x[i] > t ? p1 * x[i] + p0 : dst[i];
    else
        for (int64_t i = 0; i < n; i++) {
            double y = p[c - 1];
            for (int j = c - 2; j >= 0; j--) y = y * x[i] + p[j];
            dst[i] = first || x[i] > t ? y : dst[i];
        }
}

/* One break, pieces of degree <= 1 (relu, step, leaky relu, abs): ``pw`` of x + y (of x
 * without y) in one pass. */
static void piecewise1(const double *pw, const double *restrict x, const double *restrict y, double *restrict dst,
                       int64_t n) {
    const int c = (int)pw[1];
    const double t0 = pw[2], a0 = pw[3], l0 = pw[4], l1 = c > 1 ? pw[5] : 0.0;
    const double r0 = pw[4 + c], r1 = c > 1 ? pw[5 + c] : 0.0;
    /* the common shapes in loops of their own: a constant left piece that also holds at the
     * break (relu: x > 0 ? x : 0; the step: x > 0 ? 1 : 0), which need no test for x == t0 */
    const int flat_left = l1 == 0.0 && a0 == l0, identity = c > 1 && r1 == 1.0 && r0 == 0.0;
#define LOOP(EXPR) do {                                                                        \
        if (y) for (int64_t i = 0; i < n; i++) { const double v = x[i] + y[i]; dst[i] = (EXPR); } \
        else for (int64_t i = 0; i < n; i++) { const double v = x[i]; dst[i] = (EXPR); }          \
    } while (0)
    if (flat_left && identity) LOOP(v > t0 ? v : l0);
    else if (flat_left && c == 1) LOOP(v > t0 ? r0 : l0);
    else if (c == 1) LOOP(v > t0 ? r0 : v == t0 ? a0 : l0);
    else LOOP(v > t0 ? r1 * v + r0 : v == t0 ? a0 : l1 * v + l0);
#undef LOOP
}

/* The piecewise polynomial ``pw`` (see above) of x[0..n) into dst (dst != x). */
static void piecewise(const double *pw, const double *restrict x, double *restrict dst, int64_t n) {
    int m = (int)pw[0], c = (int)pw[1];
    const double *t = pw + 2, *at = t + m, *coef = at + m;
    if (m == 1 && c <= 2) {
        piecewise1(pw, x, 0, dst, n);
        return;
    }
    for (int k = 0; k <= m; k++) piece(coef + k * c, c, x, dst, n, k == 0, k ? t[k - 1] : 0.0);
    for (int b = 0; b < m; b++) {
        const double tb = t[b], ab = at[b];
        for (int64_t i = 0; i < n; i++) dst[i] = x[i] == tb ? ab : dst[i];
    }
}

/* The sums of v - shift over [0, n), v = r[i] (r[i] * r2[i] with r2), and of its square
 * with sum2 (else NULL): two sets of WIDTH running sums each (two chains of additions in
 * flight), then added up. */
static void block_moments(const double *r, const double *r2, int64_t n, double shift, double *sum, double *sum2) {
    int64_t i = 0;
    double s = 0.0, s2 = 0.0;
#if WIDTH > 1
    vec a = {0}, b = {0}, a2 = {0}, b2 = {0}, v, w, u;
    for (; i + 2 * WIDTH <= n; i += 2 * WIDTH) {
        memcpy(&v, r + i, sizeof v);
        memcpy(&w, r + i + WIDTH, sizeof w);
        if (r2) {
            memcpy(&u, r2 + i, sizeof u);
            v *= u;
            memcpy(&u, r2 + i + WIDTH, sizeof u);
            w *= u;
        }
        v -= shift;
        w -= shift;
        a += v;
        b += w;
        if (sum2) {
            a2 += v * v;
            b2 += w * w;
        }
    }
    a += b;
    a2 += b2;
    for (int k = 0; k < WIDTH; k++) {
        s += a[k];
        s2 += a2[k];
    }
#endif
    for (; i < n; i++) {
        double d = (r2 ? r[i] * r2[i] : r[i]) - shift;
        s += d;
        s2 += d * d;
    }
    *sum += s;
    if (sum2) *sum2 += s2;
}

/* Output q's mean (means[q]) and, where errs[q] is given, the standard error of the mean (as
 * for independent points) at j (the order the entries are taken in: written in sequence, the
 * caller puts them back in the batch's order) from an entry's sums of (v - shift) and of its
 * square (shift: output 0's, 0 for the others). */
static void finish(int64_t j, int64_t n, double shift, const double *sums, const double *sums2, int n_out,
                   double *const *means, double *const *errs) {
    for (int q = 0; q < n_out; q++) {
        double mu = sums[q] / (double)n;
        means[q][j] = (q ? 0.0 : shift) + mu;
        if (!errs[q]) continue;
        double var = (sums2[q] - (double)n * mu * mu) / (double)(n > 1 ? n - 1 : 1);
        errs[q][j] = sqrt((var > 0.0 ? var : 0.0) / (double)n);
    }
}

/* A program compiled to C (kernels/native.py builds it from pointwise.Program.c_body): over
 * the points [0, m) of a block, slot s being c[2s] e[2s][i] + c[2s + 1] e[2s + 1][i], it adds
 * output q to acc[2q] and, for the outputs whose standard error is wanted, its square to
 * acc[2q + 1] (a program of several expectations on the same points: one per member). */
typedef void (*body_fn)(const double *const *e, const double *c, int64_t m, double *acc);

/* ntk_qmc with a compiled body: every slot has at most two terms (blocks of at most 2 x 2;
 * the caller checks); a slot's missing term reads the point of its first with coefficient 0,
 * which adds an exact zero. */
static int run_body(body_fn body, int n_slots, int n_terms, const int32_t *term_slot, const int32_t *term_col,
                    const double *coef, const double *points, int64_t n, int64_t nets, const int64_t *net_of,
                    int64_t t, int64_t rows, int n_out, double *const *means, double *const *errs,
                    int64_t lo, int64_t hi) {
    enum { MAX_SLOTS = 64 };
    int first[MAX_SLOTS], second[MAX_SLOTS];
    if (n_slots > MAX_SLOTS || n_out < 1 || n_out > QMC_MAX_OUT) return -1;
    for (int s = 0; s < n_slots; s++) first[s] = second[s] = -1;
    for (int k = 0; k < n_terms; k++) {
        int s = term_slot[k];
        if (s < 0 || s >= n_slots || second[s] >= 0) return -1;
        if (first[s] < 0) first[s] = k;
        else second[s] = k;
    }
    const double *e[2 * MAX_SLOTS];
    double c[2 * MAX_SLOTS];
    int64_t ready = -1;               /* the net whose points e holds (the entries of a position share it) */
    for (int64_t j = lo; j < hi; j++) {
        const int64_t ent = (j % rows) * t + j / rows;
        const int64_t net = net_of ? net_of[ent % t] : 0;
        double sums[QMC_MAX_OUT] = {0}, sums2[QMC_MAX_OUT] = {0};
        const double *cj = coef + j * n_terms;
        for (int s = 0; s < n_slots; s++) {
            c[2 * s] = first[s] >= 0 ? cj[first[s]] : 0.0;
            c[2 * s + 1] = second[s] >= 0 ? cj[second[s]] : 0.0;
        }
        for (int64_t start = 0; start < n; start += BLOCK) {
            int64_t m = n - start < BLOCK ? n - start : BLOCK;
            if (net != ready || n > BLOCK) {
                for (int s = 0; s < n_slots; s++) {
                    int k1 = first[s], k2 = second[s];
                    e[2 * s] = points + (k1 >= 0 ? ((int64_t)term_col[k1] * nets + net) * n + start : 0);
                    e[2 * s + 1] = k2 >= 0 ? points + ((int64_t)term_col[k2] * nets + net) * n + start : e[2 * s];
                }
                ready = n > BLOCK ? -1 : net;
            }
            double block[2 * QMC_MAX_OUT] = {0};
            body(e, c, m, block);
            for (int q = 0; q < n_out; q++) {
                sums[q] += block[2 * q];
                sums2[q] += block[2 * q + 1];
            }
        }
        /* unshifted sums of squares: the variance loses about log10(mean^2 / variance) of its 16
         * digits (3 for a step product of mean 0.999), and it only sets the standard error */
        finish(j, n, 0.0, sums, sums2, n_out, means, errs);
    }
    return 0;
}

/* Entries [lo, hi) of a batch of rows x t entries, entry e at position e % t with net
 * net_of[e % t] (net 0 without net_of), taken position by position (j = pos * rows + row,
 * e = row * t + pos): the entries of one position share its net, whose points then stay in
 * L1 from one entry to the next; the results are written at j.  Slot s of a point is
 * sum over the terms k with term_slot[k] == s of coef[j * n_terms + k] * points[term_col[k]][net][i]
 * (the coefficients packed in the order the entries are taken);
 * points: (dims, nets, n).  Returns 0, or -1 for a bad instruction. */
int ntk_qmc(const int32_t *code, int n_code, const double *consts, int registers, int n_slots,
            int n_terms, const int32_t *term_slot, const int32_t *term_col, const double *coef,
            const double *points, int64_t n, int64_t nets, const int64_t *net_of, int64_t t, int64_t rows,
            int n_out, double *const *means, double *const *errs, double *regs,
            int64_t lo, int64_t hi, body_fn body) {
    if (body) return run_body(body, n_slots, n_terms, term_slot, term_col, coef, points, n, nets, net_of, t, rows,
                              n_out, means, errs, lo, hi);
    if (n_out < 1 || n_out > QMC_MAX_OUT) return -1;
    for (int q = 1; q < n_out; q++)
        if (errs[q]) return -1;          /* interpreted: the standard error of output 0 only */
    for (int k = 0; k < n_code; k++) {
        const int32_t *q = code + k * QMC_WIDTH;
        int out = q[0] == Q_OUT || q[0] == Q_OUTMUL;
        if (q[0] < Q_CONST || q[0] > Q_OUTMUL || q[1] < 0 || q[1] >= (out ? n_out : registers)) return -1;
        if (q[0] == Q_CONST)
            for (int i = 0; i < BLOCK; i++) regs[(int64_t)q[1] * BLOCK + i] = consts[q[2]];
    }
    for (int64_t j = lo; j < hi; j++) {
        const int64_t e = (j % rows) * t + j / rows;
        const int64_t net = net_of ? net_of[e % t] : 0;
        double shift = 0.0, sums[QMC_MAX_OUT] = {0}, sums2[QMC_MAX_OUT] = {0};
        for (int64_t start = 0; start < n; start += BLOCK) {
            int64_t m = n - start < BLOCK ? n - start : BLOCK;
            for (int s = 0; s < n_slots; s++) {     /* ((0 + c_0 eps_0) + c_1 eps_1) + ...: two terms a pass */
                double *restrict z = regs + (int64_t)s * BLOCK;
                int first = 1;
                for (int k = 0; k < n_terms; k++) {
                    if (term_slot[k] != s) continue;
                    int k2 = k + 1;
                    while (k2 < n_terms && term_slot[k2] != s) k2++;
                    const double c = coef[j * n_terms + k];
                    const double *restrict u = points + ((int64_t)term_col[k] * nets + net) * n + start;
                    if (k2 < n_terms) {
                        const double c2 = coef[j * n_terms + k2];
                        const double *restrict v = points + ((int64_t)term_col[k2] * nets + net) * n + start;
                        if (first) for (int64_t i = 0; i < m; i++) z[i] = (0.0 + c * u[i]) + c2 * v[i];
                        else for (int64_t i = 0; i < m; i++) z[i] = (z[i] + c * u[i]) + c2 * v[i];
                        k = k2;
                    } else if (first) {
                        for (int64_t i = 0; i < m; i++) z[i] = 0.0 + c * u[i];
                    } else {
                        for (int64_t i = 0; i < m; i++) z[i] = z[i] + c * u[i];
                    }
                    first = 0;
                }
                if (first) for (int64_t i = 0; i < m; i++) z[i] = 0.0;
            }
            for (int k = 0; k < n_code; k++) {
                const int32_t *q = code + k * QMC_WIDTH;
                double *dst = regs + (int64_t)q[1] * BLOCK;
                const double *a = regs + (int64_t)q[2] * BLOCK, *b = regs + (int64_t)q[3] * BLOCK;
                switch (q[0]) {
                case Q_ADD: for (int64_t i = 0; i < m; i++) dst[i] = a[i] + b[i]; break;
                case Q_MUL: for (int64_t i = 0; i < m; i++) dst[i] = a[i] * b[i]; break;
                case Q_PWADD: piecewise1(consts + q[4], a, b, dst, m); break;
                case Q_PW: piecewise(consts + q[4], a, dst, m); break;
                case Q_OUT:
                case Q_OUTMUL: {
                    const double *r2 = q[0] == Q_OUTMUL ? b : 0;
                    if (q[1] > 0) {
                        block_moments(a, r2, m, 0.0, &sums[q[1]], 0);
                        break;
                    }
                    if (start == 0) shift = r2 ? a[0] * r2[0] : a[0];   /* near the mean, for the squares */
                    block_moments(a, r2, m, shift, &sums[0], &sums2[0]);
                    break;
                }
                default: break;
                }
            }
        }
        finish(j, n, shift, sums, sums2, n_out, means, errs);
    }
    return 0;
}

/* The 2 x 2 blocks [[a, b], [b, c]] factored as qmc._factor2 does, in one pass with its
 * operations in its order: variances clamped at 0, the correlation taken as 0 where a
 * variance is 0 and clamped into [-1, 1]; the factor's entries f00, f10, f11 (f01 = 0) and
 * the eigenvalues lo <= hi (clamped at 0). */
void ntk_factor2(const double *a_, const double *b, const double *c_, double *f00, double *f10, double *f11,
                 double *lo, double *hi, int64_t n, double *stats) {
    /* stats: the largest squared norms of the two columns and of hi, whether f00, f10, f11
     * are nonzero anywhere (prepare's tests, without a pass of its own each) */
    double col0 = 0.0, col1 = 0.0, top = 0.0;
    int nz00 = 0, nz10 = 0, nz11 = 0;
    for (int64_t i = 0; i < n; i++) {
        const double a = a_[i] > 0.0 ? a_[i] : 0.0, c = c_[i] > 0.0 ? c_[i] : 0.0;
        const double sa = sqrt(a), sc = sqrt(c), s = sa * sc;
        double rho = s > 0.0 ? b[i] / s : 0.0;
        rho = rho < -1.0 ? -1.0 : rho > 1.0 ? 1.0 : rho;
        const double half = 0.5 * (a + c), d = a - c, r = rho * s;
        const double gap = sqrt(0.25 * (d * d) + r * r), one = 1.0 - rho * rho;
        f00[i] = sa;
        f10[i] = rho * sc;
        f11[i] = sc * sqrt(one > 0.0 ? one : 0.0);
        lo[i] = half - gap > 0.0 ? half - gap : 0.0;
        hi[i] = half + gap > 0.0 ? half + gap : 0.0;
        const double n0 = f00[i] * f00[i] + f10[i] * f10[i], n1 = f11[i] * f11[i];
        col0 = n0 > col0 ? n0 : col0;
        col1 = n1 > col1 ? n1 : col1;
        top = hi[i] > top ? hi[i] : top;
        nz00 |= f00[i] != 0.0;
        nz10 |= f10[i] != 0.0;
        nz11 |= f11[i] != 0.0;
    }
    stats[0] = col0;
    stats[1] = col1;
    stats[2] = top;
    stats[3] = nz00;
    stats[4] = nz10;
    stats[5] = nz11;
}

/* The coefficients of ``k`` terms (arrays of rows x t entries) packed in the order ntk_qmc
 * takes the entries: out[(pos * rows + row) * k + j] = terms[j][row * t + pos]. */
void ntk_pack(const double *const *terms, int k, int64_t rows, int64_t t, double *out) {
    enum { SPAN = 32 };              /* positions at a time: the lines written stay in cache */
    for (int64_t p0 = 0; p0 < t; p0 += SPAN) {
        const int64_t p1 = p0 + SPAN < t ? p0 + SPAN : t;
        for (int64_t row = 0; row < rows; row++)
            for (int64_t pos = p0; pos < p1; pos++) {
                double *dst = out + (pos * rows + row) * k;
                for (int j = 0; j < k; j++) dst[j] = terms[j][row * t + pos];
            }
    }
}

/* The largest numerical rank over n entries of k eigenvalue arrays (quadrature's
 * _rank_from_eigenvalues): an eigenvalue counts above rtol times its entry's largest, and
 * above 0. */
int ntk_rank(const double *const *ev, int k, int64_t n, double rtol) {
    if (k == 0) return 0;
    int best = 0;
    for (int64_t i = 0; i < n; i++) {
        double top = ev[0][i];
        for (int j = 1; j < k; j++) top = ev[j][i] > top ? ev[j][i] : top;
        int count = 0;
        for (int j = 0; j < k; j++) count += ev[j][i] > rtol * top && ev[j][i] > 0.0;
        best = count > best ? count : best;
    }
    return best;
}
