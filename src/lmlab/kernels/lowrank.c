/* The thin (rank-r) products of a LoRA / DoRA adapter's step, float32, CPU.
 *
 * Built by lmlab/kernels/build.py on first use (cc -O3 -march=native -fopenmp) and called through ctypes by
 * lmlab/kernels/lowrank.py. A rank-8 product reads a whole [N, in] or [N, out] activation for 8 columns of
 * output: the BLAS runs it on one core at a fraction of its GEMM speed, and an adapter has four of them per step
 * (plus the two rank-r updates that merge B A into the weight). Here the backward's three are one pass over the
 * rows of grad_y and x, split across threads, with 8 rows at a time in registers.
 *
 * Math (row-major, x [N, in], grad_y [N, out], A [r, in], bt = B^T [r, out] (DoRA: with g folded in), s the
 * scaling):
 *   lmlab_lowrank_rows      h[n, k] = scale * x_n . A_k                                 (forward: h0 = x A^T)
 *   lmlab_lowrank_backward  grad_h[n, k] = s * grad_y_n . bt_k
 *                           grad_factor[n] = grad_h_n . h0_n                            (if a factor is given)
 *                           grad_h0[n, k] = grad_h[n, k] * factor[n] * keep             (factor, keep optional)
 *                           grad_B[o, k] = s * g[o] * sum_n h[n, k] grad_y[n, o]         (g optional)
 *                           grad_A[k, i] = sum_n grad_h0[n, k] x[n, i]
 *   lmlab_lowrank_update    out = w + s * P Q  (P [rows, r] any strides, Q [r, cols] rows contiguous; out may be w)
 * Both entry points that compute a product can also run one rank-r update in the same parallel region (the
 * merged weight W0 + s B A of that step).
 *
 * Sums run in a fixed order per thread count (each thread owns a contiguous range of rows; partial sums over rows
 * are added in thread order). No -ffast-math: NaN and Inf propagate as in IEEE arithmetic.
 * Returns 0, or 1 when a work buffer could not be allocated.
 */
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define L 16  /* lanes per vector */
#define RB 8  /* rows per block */
#define KB 2  /* ranks per dot-product pass (RB x KB vector accumulators) */

typedef float vf __attribute__((vector_size(4 * L), aligned(4))); /* unaligned loads and stores */

static inline vf splat(float x) { return (vf){0} + x; }
static inline vf loadu(const float *p) { return *(const vf *)p; }
static inline void storeu(float *p, vf x) { *(vf *)p = x; }

#if defined(__clang__)
#define SHUFFLE2(a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)
#else
typedef int32_t vi __attribute__((vector_size(4 * L)));
#define SHUFFLE2(a, b, ...) __builtin_shuffle(a, b, (vi){__VA_ARGS__})
#endif

/* Sums of 16 vectors at once, lane j of the result = sum of v[j] (a transposing tree: 15 adds, 30 shuffles). */
static inline vf sum16(const vf *v) {
  vf u[8], w[4], z[2];
  for (int i = 0; i < 8; i++)
    u[i] = SHUFFLE2(v[2 * i], v[2 * i + 1], 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
           SHUFFLE2(v[2 * i], v[2 * i + 1], 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
  for (int i = 0; i < 4; i++)
    w[i] = SHUFFLE2(u[2 * i], u[2 * i + 1], 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27) +
           SHUFFLE2(u[2 * i], u[2 * i + 1], 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31);
  for (int i = 0; i < 2; i++)
    z[i] = SHUFFLE2(w[2 * i], w[2 * i + 1], 0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29) +
           SHUFFLE2(w[2 * i], w[2 * i + 1], 2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30, 31);
  return SHUFFLE2(z[0], z[1], 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30) +
         SHUFFLE2(z[0], z[1], 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
}

/* The sum of one vector's lanes, as a tree. */
static inline float hsum(vf x) {
  float s[L];
  for (int l = 0; l < L; l++) s[l] = x[l];
  for (int w = L / 2; w > 0; w /= 2)
    for (int l = 0; l < w; l++) s[l] += s[l + w];
  return s[0];
}

/* A rank-r update of rows [lo, hi): out[i, :] = w[i, :] + s * sum_k P[i, k] Q[k, :]. */
typedef struct {
  const float *w, *p, *q;
  float *out;
  long ldw, ldo, prs, pcs;
  int rows, cols, r;
  float s;
} update_t;

static void update_rows(const update_t *u, long lo, long hi) {
  for (long i = lo; i < hi; i++) {
    const float *w = u->w + i * u->ldw, *p = u->p + i * u->prs;
    float *out = u->out + i * u->ldo;
    int c = 0;
    for (; c + 2 * L <= u->cols; c += 2 * L) {
      vf a0 = loadu(w + c), a1 = loadu(w + c + L), d0 = {0}, d1 = {0};
      for (int k = 0; k < u->r; k++) {
        vf pk = splat(p[k * u->pcs]);
        d0 += pk * loadu(u->q + (long)k * u->cols + c);
        d1 += pk * loadu(u->q + (long)k * u->cols + c + L);
      }
      storeu(out + c, a0 + u->s * d0);
      storeu(out + c + L, a1 + u->s * d1);
    }
    for (; c < u->cols; c++) {
      float d = 0.0f;
      for (int k = 0; k < u->r; k++) d += p[k * u->pcs] * u->q[(long)k * u->cols + c];
      out[c] = w[c] + u->s * d;
    }
  }
}

/* out[n, k] = scale * X_n . M_k for NR rows of X and ranks [k0, k0 + nk), nk <= KB, over K columns. */
static inline __attribute__((always_inline)) void dots(const float *x, long ldx, const int NR, const float *m, int K,
                                                       int k0, const int nk, float scale, float *out, int r) {
  vf acc[RB][KB];
  for (int n = 0; n < NR; n++)
    for (int j = 0; j < nk; j++) acc[n][j] = (vf){0};
  int c = 0;
  for (; c + L <= K; c += L) {
    vf mv[KB];
    for (int j = 0; j < nk; j++) mv[j] = loadu(m + (long)(k0 + j) * K + c);
    for (int n = 0; n < NR; n++) {
      vf xv = loadu(x + n * ldx + c);
      for (int j = 0; j < nk; j++) acc[n][j] += xv * mv[j];
    }
  }
  float sums[RB * KB];
  if (NR * nk == 16) {
    vf all = sum16(acc[0]); /* lane n * KB + j */
    for (int i = 0; i < 16; i++) sums[i] = all[i];
  } else {
    for (int n = 0; n < NR; n++)
      for (int j = 0; j < nk; j++) sums[n * KB + j] = hsum(acc[n][j]);
  }
  for (int n = 0; n < NR; n++)
    for (int j = 0; j < nk; j++) {
      float d = sums[n * KB + j];
      for (int cc = c; cc < K; cc++) d += x[n * ldx + cc] * m[(long)(k0 + j) * K + cc];
      out[n * r + k0 + j] = scale * d;
    }
}

/* out[n, :] = scale * X_n M^T for NR rows (all r ranks). */
static inline __attribute__((always_inline)) void row_block_dots(const float *x, long ldx, const int NR, const float *m,
                                                                 int K, int r, float scale, float *out) {
  int k0 = 0;
  for (; k0 + KB <= r; k0 += KB) dots(x, ldx, NR, m, K, k0, KB, scale, out, r);
  for (; k0 < r; k0++) dots(x, ldx, NR, m, K, k0, 1, scale, out, r);
}

/* acc[k0 + k, c : c + NV L] += sum_n C[n, k0 + k] X_n[c : c + NV L] for NR rows and NK ranks, in registers. */
static inline __attribute__((always_inline)) void accumulate_tile(const float *c, const int NR, const float *x,
                                                                  long ldx, int K, int r, int k0, const int NK,
                                                                  int col, const int NV, float *acc) {
  vf a[8][2];
  for (int k = 0; k < NK; k++)
    for (int v = 0; v < NV; v++) a[k][v] = loadu(acc + (long)(k0 + k) * K + col + v * L);
  for (int n = 0; n < NR; n++) {
    vf xv[2];
    for (int v = 0; v < NV; v++) xv[v] = loadu(x + n * ldx + col + v * L);
    for (int k = 0; k < NK; k++) {
      vf cv = splat(c[n * r + k0 + k]);
      for (int v = 0; v < NV; v++) a[k][v] += cv * xv[v];
    }
  }
  for (int k = 0; k < NK; k++)
    for (int v = 0; v < NV; v++) storeu(acc + (long)(k0 + k) * K + col + v * L, a[k][v]);
}

static inline __attribute__((always_inline)) void accumulate_cols(const float *c, const int NR, const float *x,
                                                                  long ldx, int K, int r, int col, const int NV,
                                                                  float *acc) {
  int k0 = 0;
  for (; k0 + 8 <= r; k0 += 8) accumulate_tile(c, NR, x, ldx, K, r, k0, 8, col, NV, acc);
  for (; k0 + 4 <= r; k0 += 4) accumulate_tile(c, NR, x, ldx, K, r, k0, 4, col, NV, acc);
  for (; k0 < r; k0++) accumulate_tile(c, NR, x, ldx, K, r, k0, 1, col, NV, acc);
}

/* acc[k, :] += sum_n C[n, k] X_n for NR rows of X (C [NR, r] row-major), over K columns. */
static inline __attribute__((always_inline)) void accumulate(const float *c, const int NR, const float *x, long ldx,
                                                             int K, int r, float *acc) {
  int col = 0;
  for (; col + 2 * L <= K; col += 2 * L) accumulate_cols(c, NR, x, ldx, K, r, col, 2, acc);
  for (; col + L <= K; col += L) accumulate_cols(c, NR, x, ldx, K, r, col, 1, acc);
  for (; col < K; col++)
    for (int k = 0; k < r; k++) {
      float a = acc[(long)k * K + col];
      for (int n = 0; n < NR; n++) a += c[n * r + k] * x[n * ldx + col];
      acc[(long)k * K + col] = a;
    }
}

/* Threads for N rows: at most `threads` (lowrank.py's choice from the call's work) and at least 32 rows per
 * thread (smaller products are not worth waking a thread for); 1 runs without a parallel region. */
static int threads_for(long n, int threads) {
  long t = n / 32;
  if (t < 1) t = 1;
  return t < threads ? (int)t : threads;
}

static void update_share(const update_t *u, int t, int nt) {
  if (u == NULL) return;
  long lo = (long)u->rows * t / nt, hi = (long)u->rows * (t + 1) / nt;
  update_rows(u, lo, hi);
}

static void rows_share(const float *x, long ldx, long N, int K, const float *a, int r, float scale, float *h, int t,
                       int nt) {
  long lo = N * t / nt, hi = N * (t + 1) / nt, n = lo;
  for (; n + RB <= hi; n += RB) row_block_dots(x + n * ldx, ldx, RB, a, K, r, scale, h + n * r);
  for (; n < hi; n++) row_block_dots(x + n * ldx, ldx, 1, a, K, r, scale, h + n * r);
}

/* h = scale * x A^T ([N, r], row-major; skipped when h is NULL), and the rank-r update u (when not NULL). */
int lmlab_lowrank_rows(const float *x, long ldx, long N, int K, const float *a, int r, float scale, float *h,
                       const update_t *u, int threads) {
  long work = (h ? N : 0) + (u ? u->rows : 0);
  int nt = threads_for(work, threads);
#pragma omp parallel num_threads(nt) if (nt > 1)
  {
    int t = omp_get_thread_num(), n_t = omp_get_num_threads();
    if (h) rows_share(x, ldx, N, K, a, r, scale, h, t, n_t);
    update_share(u, t, n_t);
  }
  return 0;
}

/* The rank-r update u alone. */
int lmlab_lowrank_update(const update_t *u, int threads) {
  return lmlab_lowrank_rows(NULL, 0, 0, 0, NULL, 0, 0.0f, NULL, u, threads);
}

typedef struct {
  const float *gy, *x, *h, *h0, *bt, *g, *factor;
  float *grad_b, *grad_a, *grad_h0, *grad_factor; /* outputs, each optional (NULL) */
  long ldg, ldx, N;
  int in, out, r;
  float s, keep;
} backward_t;

/* One thread's rows [lo, hi): grad_h (-> grad_factor, grad_h0), and its partial sums of grad_B^T [r, out] and
 * grad_A [r, in]. */
static void backward_rows(const backward_t *b, long lo, long hi, float *gbt, float *ga) {
  float gh[RB * 64];
  int r = b->r;
  int need_gh = b->grad_a || b->grad_h0 || b->grad_factor;
  for (long n = lo; n < hi; n += RB) {
    int nr = hi - n < RB ? (int)(hi - n) : RB;
    const float *gy = b->gy + n * b->ldg, *x = b->x + n * b->ldx;
    if (need_gh) {
      if (nr == RB)
        row_block_dots(gy, b->ldg, RB, b->bt, b->out, r, b->s, gh);
      else
        for (int i = 0; i < nr; i++) row_block_dots(gy + i * b->ldg, b->ldg, 1, b->bt, b->out, r, b->s, gh + i * r);
      for (int i = 0; i < nr; i++) {
        float *row = gh + i * r, mul = b->keep;
        if (b->factor) {
          if (b->grad_factor) {
            float d = 0.0f;
            for (int k = 0; k < r; k++) d += row[k] * b->h0[(n + i) * r + k];
            b->grad_factor[n + i] = d;
          }
          mul *= b->factor[n + i];
        }
        if (mul != 1.0f)
          for (int k = 0; k < r; k++) row[k] *= mul;
        if (b->grad_h0) memcpy(b->grad_h0 + (n + i) * r, row, sizeof(float) * r);
      }
    }
    if (b->grad_b) {
      if (nr == RB)
        accumulate(b->h + n * r, RB, gy, b->ldg, b->out, r, gbt);
      else
        for (int i = 0; i < nr; i++) accumulate(b->h + (n + i) * r, 1, gy + i * b->ldg, b->ldg, b->out, r, gbt);
    }
    if (b->grad_a) {
      if (nr == RB)
        accumulate(gh, RB, x, b->ldx, b->in, r, ga);
      else
        for (int i = 0; i < nr; i++) accumulate(gh + i * r, 1, x + i * b->ldx, b->ldx, b->in, r, ga);
    }
  }
}

/* The backward's thin products (see the top of the file) and the rank-r update u (when not NULL). r <= 64. */
int lmlab_lowrank_backward(const backward_t *b, const update_t *u, int threads) {
  int nt = threads_for(b->N, threads), r = b->r;
  size_t per_thread = (size_t)r * ((b->grad_b ? b->out : 0) + (b->grad_a ? b->in : 0));
  float *partial = calloc((size_t)nt * per_thread + 1, sizeof(float));
  if (partial == NULL) return 1;
#pragma omp parallel num_threads(nt) if (nt > 1)
  {
    int t = omp_get_thread_num(), n_t = omp_get_num_threads();
    float *gbt = partial + (size_t)t * per_thread, *ga = gbt + (b->grad_b ? (size_t)r * b->out : 0);
    backward_rows(b, b->N * t / n_t, b->N * (t + 1) / n_t, gbt, ga);
    update_share(u, t, n_t);
#pragma omp barrier
    if (b->grad_b) {
#pragma omp for schedule(static) nowait
      for (int o = 0; o < b->out; o++)
        for (int k = 0; k < r; k++) {
          float v = 0.0f;
          for (int j = 0; j < n_t; j++) v += partial[(size_t)j * per_thread + (size_t)k * b->out + o];
          b->grad_b[(long)o * r + k] = b->s * (b->g ? b->g[o] : 1.0f) * v;
        }
    }
    if (b->grad_a) {
      size_t offset = b->grad_b ? (size_t)r * b->out : 0;
#pragma omp for schedule(static) nowait
      for (long e = 0; e < (long)r * b->in; e++) {
        float v = 0.0f;
        for (int j = 0; j < n_t; j++) v += partial[(size_t)j * per_thread + offset + e];
        b->grad_a[e] = v;
      }
    }
  }
  free(partial);
  return 0;
}
