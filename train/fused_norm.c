/* Training batch norm for bf16 channels-last activations on a CPU, with the ReLU and the residual
 * add that follow it in a ResNet block (train/fused_norm.py builds and loads this file).
 *
 * An activation is M = N*H*W rows of C channels. ATen runs batch norm, the add and the ReLU as
 * separate passes over memory; here the forward is two passes (statistics, then normalize + add +
 * ReLU) and the backward two (per-channel sums, then the input gradient). The ReLU's mask is
 * recomputed from x where there is no residual, so neither pass reads the output.
 *
 * bf16 is handled as raw 16-bit patterns: widening is a shift, narrowing rounds to nearest even,
 * so every loop over channels vectorizes. Sums accumulate in fp32 over blocks of rows and in fp64
 * across blocks; the statistics are taken about a per-channel shift (the first row) so that the
 * variance does not cancel where the mean is large against the spread.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <omp.h>

#define BLOCK 64

static inline float widen(uint16_t v) {
    uint32_t u = (uint32_t)v << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline uint16_t narrow(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    u += 0x7FFFu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

static inline int positive(uint16_t v) { return !(v & 0x8000u) && (v & 0x7FFFu); }

/* Per-channel sums over the rows, split among the threads: a[c] += fa(row, c), b[c] += fb(row, c).
 * kind 0: statistics of x about shift;  1: sums of g and g*(x - mean), g = dy masked by
 * x*scale + bias > 0 (relu) or unmasked;  2: as 1 with g = dy masked by y > 0, g written out. */
static int sums(int kind, int relu, const uint16_t *x, const uint16_t *dy, const uint16_t *y, uint16_t *g_out,
                int64_t M, int64_t C, const float *center, const float *scale, const float *bias,
                double *a, double *b) {
    int threads = omp_get_max_threads();
    double *partial = calloc((size_t)threads * 2 * C, sizeof(double));
    int failed = partial == NULL;
    if (failed) return -1;
    #pragma omp parallel num_threads(threads)
    {
        int t = omp_get_thread_num(), n = omp_get_num_threads();
        int64_t r0 = M * t / n, r1 = M * (t + 1) / n;
        float *fa = calloc(2 * C, sizeof(float));
        if (fa == NULL) {
            #pragma omp atomic write
            failed = 1;
        } else {
            float *fb = fa + C;
            double *da = partial + (size_t)t * 2 * C, *db = da + C;
            for (int64_t r = r0; r < r1; r += BLOCK) {
                int64_t end = r + BLOCK < r1 ? r + BLOCK : r1;
                for (int64_t i = r; i < end; i++) {
                    const uint16_t *xr = x + i * C;
                    if (kind == 0) {
                        #pragma omp simd
                        for (int64_t c = 0; c < C; c++) {
                            float v = widen(xr[c]) - center[c];
                            fa[c] += v;
                            fb[c] += v * v;
                        }
                    } else if (kind == 2) {
                        const uint16_t *dr = dy + i * C, *yr = y + i * C;
                        uint16_t *gr = g_out + i * C;
                        #pragma omp simd
                        for (int64_t c = 0; c < C; c++) {
                            uint16_t gb = positive(yr[c]) ? dr[c] : 0;
                            float gv = widen(gb);
                            gr[c] = gb;
                            fa[c] += gv;
                            fb[c] += gv * (widen(xr[c]) - center[c]);
                        }
                    } else if (relu) {
                        const uint16_t *dr = dy + i * C;
                        #pragma omp simd
                        for (int64_t c = 0; c < C; c++) {
                            float xv = widen(xr[c]);
                            float gv = xv * scale[c] + bias[c] > 0.f ? widen(dr[c]) : 0.f;
                            fa[c] += gv;
                            fb[c] += gv * (xv - center[c]);
                        }
                    } else {
                        const uint16_t *dr = dy + i * C;
                        #pragma omp simd
                        for (int64_t c = 0; c < C; c++) {
                            float gv = widen(dr[c]);
                            fa[c] += gv;
                            fb[c] += gv * (widen(xr[c]) - center[c]);
                        }
                    }
                }
                #pragma omp simd
                for (int64_t c = 0; c < C; c++) {
                    da[c] += fa[c];
                    db[c] += fb[c];
                    fa[c] = 0.f;
                    fb[c] = 0.f;
                }
            }
            free(fa);
        }
    }
    if (!failed) {
        for (int64_t c = 0; c < C; c++) a[c] = b[c] = 0.0;
        for (int t = 0; t < threads; t++) {
            const double *da = partial + (size_t)t * 2 * C, *db = da + C;
            for (int64_t c = 0; c < C; c++) {
                a[c] += da[c];
                b[c] += db[c];
            }
        }
    }
    free(partial);
    return failed ? -1 : 0;
}

/* y = x*scale + bias (+ identity), then ReLU where relu. Saves mean, invstd, scale and bias (C each)
 * for the backward and updates the running statistics (unbiased variance, as nn.BatchNorm2d).
 * Returns 0, or -1 where memory ran out (nothing written then). */
int imgcls_bn_forward(const uint16_t *x, const uint16_t *identity, uint16_t *y, int64_t M, int64_t C,
                      const float *weight, const float *bias_in, double eps, double momentum,
                      float *running_mean, float *running_var, int relu,
                      float *mean, float *invstd, float *scale, float *bias) {
    double *s = malloc(2 * C * sizeof(double));
    float *shift = calloc(C, sizeof(float));
    if (s == NULL || shift == NULL || M < 1) {
        free(s);
        free(shift);
        return -1;
    }
    double *q = s + C;
    for (int64_t c = 0; c < C; c++) shift[c] = widen(x[c]);
    if (sums(0, 0, x, NULL, NULL, NULL, M, C, shift, NULL, NULL, s, q)) {
        free(s);
        free(shift);
        return -1;
    }
    for (int64_t c = 0; c < C; c++) {
        double m = s[c] / M, var = q[c] / M - m * m;
        if (var < 0) var = 0;
        double is = 1.0 / sqrt(var + eps);
        mean[c] = (float)(m + shift[c]);
        invstd[c] = (float)is;
        scale[c] = (float)(weight[c] * is);
        bias[c] = (float)(bias_in[c] - (m + shift[c]) * weight[c] * is);
        if (running_mean != NULL) {
            double unbiased = M > 1 ? var * M / (M - 1) : var;
            running_mean[c] = (float)((1 - momentum) * running_mean[c] + momentum * (m + shift[c]));
            running_var[c] = (float)((1 - momentum) * running_var[c] + momentum * unbiased);
        }
    }
    free(s);
    free(shift);
    #pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < M; i++) {
        const uint16_t *xr = x + i * C;
        uint16_t *yr = y + i * C;
        if (identity != NULL) {
            const uint16_t *ir = identity + i * C;
            #pragma omp simd
            for (int64_t c = 0; c < C; c++) {
                float v = widen(xr[c]) * scale[c] + bias[c] + widen(ir[c]);
                yr[c] = narrow(relu && v < 0.f ? 0.f : v);
            }
        } else {
            #pragma omp simd
            for (int64_t c = 0; c < C; c++) {
                float v = widen(xr[c]) * scale[c] + bias[c];
                yr[c] = narrow(relu && v < 0.f ? 0.f : v);
            }
        }
    }
    return 0;
}

/* Gradients of the forward above: dx, dweight, dbias, and where there was a residual (y given:
 * the forward's output, for the ReLU's mask) the identity's gradient into g_identity.
 * dx = a*g + b*x + d per channel, with g the masked dy. Returns 0, or -1 where memory ran out. */
int imgcls_bn_backward(const uint16_t *dy, const uint16_t *x, const uint16_t *y, uint16_t *g_identity,
                       uint16_t *dx, int64_t M, int64_t C, int relu, const float *weight,
                       const float *mean, const float *invstd, const float *scale, const float *bias,
                       float *dweight, float *dbias) {
    double *sg = malloc(2 * C * sizeof(double));
    float *coef = malloc(3 * C * sizeof(float));
    if (sg == NULL || coef == NULL) {
        free(sg);
        free(coef);
        return -1;
    }
    double *sgx = sg + C;
    int residual = y != NULL;
    if (sums(residual ? 2 : 1, relu, x, dy, y, g_identity, M, C, mean, scale, bias, sg, sgx)) {
        free(sg);
        free(coef);
        return -1;
    }
    float *a = coef, *b = coef + C, *d = coef + 2 * C;
    for (int64_t c = 0; c < C; c++) {
        double is = invstd[c], w = weight[c];
        dweight[c] = (float)(sgx[c] * is);
        dbias[c] = (float)sg[c];
        double ca = w * is, cb = -ca * is * is * sgx[c] / M;
        a[c] = (float)ca;
        b[c] = (float)cb;
        d[c] = (float)(-ca * sg[c] / M - cb * mean[c]);
    }
    free(sg);
    /* with a residual the masked gradient is already in g_identity */
    const uint16_t *g = residual ? g_identity : dy;
    int mask = relu && !residual;
    #pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < M; i++) {
        const uint16_t *gr = g + i * C, *xr = x + i * C;
        uint16_t *out = dx + i * C;
        if (mask) {
            #pragma omp simd
            for (int64_t c = 0; c < C; c++) {
                float xv = widen(xr[c]);
                float gv = xv * scale[c] + bias[c] > 0.f ? widen(gr[c]) : 0.f;
                out[c] = narrow(a[c] * gv + b[c] * xv + d[c]);
            }
        } else {
            #pragma omp simd
            for (int64_t c = 0; c < C; c++) out[c] = narrow(a[c] * widen(gr[c]) + b[c] * widen(xr[c]) + d[c]);
        }
    }
    free(coef);
    return 0;
}

/* Max pooling (dilation 1, floor mode) on bf16 channels-last maps, N x H x W x C to N x OH x OW x C,
 * keeping each output's position in its window as one byte (ATen keeps an int64 index). Ties go to
 * the first position in row-major order and a NaN wins, as in ATen. */
void imgcls_maxpool_forward(const uint16_t *x, uint16_t *y, uint8_t *where, int64_t N, int64_t H, int64_t W,
                            int64_t C, int64_t OH, int64_t OW, int k, int s, int p) {
    #pragma omp parallel for schedule(static)
    for (int64_t row = 0; row < N * OH; row++) {
        int64_t n = row / OH, oh = row % OH;
        for (int64_t ow = 0; ow < OW; ow++) {
            uint16_t *yr = y + ((n * OH + oh) * OW + ow) * C;
            uint8_t *wr = where + ((n * OH + oh) * OW + ow) * C;
            int first = 1;
            for (int i = 0; i < k; i++) {
                int64_t ih = oh * s - p + i;
                if (ih < 0 || ih >= H) continue;
                for (int j = 0; j < k; j++) {
                    int64_t iw = ow * s - p + j;
                    if (iw < 0 || iw >= W) continue;
                    const uint16_t *xr = x + ((n * H + ih) * W + iw) * C;
                    uint8_t pos = (uint8_t)(i * k + j);
                    if (first) {
                        #pragma omp simd
                        for (int64_t c = 0; c < C; c++) {
                            yr[c] = xr[c];
                            wr[c] = pos;
                        }
                        first = 0;
                        continue;
                    }
                    #pragma omp simd
                    for (int64_t c = 0; c < C; c++) {
                        float v = widen(xr[c]), m = widen(yr[c]);
                        int take = v > m || v != v;
                        yr[c] = take ? xr[c] : yr[c];
                        wr[c] = take ? pos : wr[c];
                    }
                }
            }
        }
    }
}

/* dx[input position] = the sum, in fp32 rounded once, of the output gradients whose window max it was.
 * A gather over the (at most ceil(k/s)^2) windows covering each input: no zero-filled buffer, no
 * scattered writes, and each thread writes its own rows. C is at most MAXPOOL_CHANNELS (the caller
 * checks): the accumulator lives on the thread's stack. */
#define MAXPOOL_CHANNELS 4096
void imgcls_maxpool_backward(const uint16_t *g, const uint8_t *where, uint16_t *dx, int64_t N, int64_t H,
                             int64_t W, int64_t C, int64_t OH, int64_t OW, int k, int s, int p) {
    #pragma omp parallel for schedule(static)
    for (int64_t row = 0; row < N * H; row++) {
        float acc[MAXPOOL_CHANNELS];
        int64_t n = row / H, ih = row % H;
        /* the windows oh with oh*s - p <= ih < oh*s - p + k, and likewise ow */
        int64_t oh0 = ih + p - k + 1 > 0 ? (ih + p - k + 1 + s - 1) / s : 0;
        int64_t oh1 = (ih + p) / s < OH - 1 ? (ih + p) / s : OH - 1;
        for (int64_t iw = 0; iw < W; iw++) {
            int64_t ow0 = iw + p - k + 1 > 0 ? (iw + p - k + 1 + s - 1) / s : 0;
            int64_t ow1 = (iw + p) / s < OW - 1 ? (iw + p) / s : OW - 1;
            #pragma omp simd
            for (int64_t c = 0; c < C; c++) acc[c] = 0.f;
            for (int64_t oh = oh0; oh <= oh1; oh++) {
                for (int64_t ow = ow0; ow <= ow1; ow++) {
                    uint8_t pos = (uint8_t)((ih - (oh * s - p)) * k + (iw - (ow * s - p)));
                    const uint16_t *gr = g + ((n * OH + oh) * OW + ow) * C;
                    const uint8_t *wr = where + ((n * OH + oh) * OW + ow) * C;
                    #pragma omp simd
                    for (int64_t c = 0; c < C; c++) acc[c] += wr[c] == pos ? widen(gr[c]) : 0.f;
                }
            }
            uint16_t *out = dx + ((n * H + ih) * W + iw) * C;
            #pragma omp simd
            for (int64_t c = 0; c < C; c++) out[c] = narrow(acc[c]);
        }
    }
}
