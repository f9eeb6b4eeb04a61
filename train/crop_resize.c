/* A batch's random crops, resized and flipped, in one call: the train preset's RandomResizedCrop
 * and RandomHorizontalFlip on images decoded once into memory (train/batch_crop.py).
 *
 * The arithmetic is that of torch's uint8 antialiased bilinear resize (Pillow's): triangle-filter
 * weights computed in double, normalised, scaled to int16 at the largest precision that keeps the
 * largest weight below 2^15, rounded half up; a horizontal pass into a uint8 buffer, then a vertical
 * pass, each adding half of the last place before the shift and clamping to 0..255. The tests
 * compare every pixel with torchvision's resize of the same box. torch's kernel spends most of
 * its time unpacking three channels into four and back; here the channels stay interleaved, the
 * vertical pass runs over whole rows, and the images of a batch share the cores. On a CPU host
 * each crop is also normalized as the preset's normalize does, while it is still in the cache.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

typedef struct {
    int64_t *start;   /* first input index of each output */
    int64_t *count;   /* taps of each output */
    int32_t *weight;  /* taps per output: `taps` */
    int64_t taps;
    int precision;
} filter_t;

static void filter_free(filter_t *f) {
    free(f->start);
    free(f->count);
    free(f->weight);
}

static double triangle(double x) {
    x = fabs(x);
    return x < 1.0 ? 1.0 - x : 0.0;
}

/* Weights of in_size -> out_size, as ATen's _compute_index_ranges_int16_weights (antialias,
 * align_corners=false, no explicit scale). Returns 0 when out of memory. */
static int filter_make(filter_t *f, int64_t in_size, int64_t out_size) {
    double scale = (double)in_size / (double)out_size;
    double support = scale >= 1.0 ? scale : 1.0;  /* bilinear: interp_size 2, half of it */
    double invscale = scale >= 1.0 ? 1.0 / scale : 1.0;
    f->taps = (int64_t)ceil(support) * 2 + 1;
    f->start = malloc(sizeof(int64_t) * out_size);
    f->count = malloc(sizeof(int64_t) * out_size);
    f->weight = calloc(out_size * f->taps, sizeof(int32_t));
    double *w = malloc(sizeof(double) * out_size * f->taps);
    if (!f->start || !f->count || !f->weight || !w) {
        free(w);
        filter_free(f);
        return 0;
    }
    double w_max = 0.0;
    for (int64_t i = 0; i < out_size; i++) {
        double center = scale * (i + 0.5);
        int64_t lo = (int64_t)(center - support + 0.5);
        if (lo < 0) lo = 0;
        int64_t hi = (int64_t)(center + support + 0.5);
        if (hi > in_size) hi = in_size;
        int64_t n = hi - lo;
        if (n > f->taps) n = f->taps;
        double *wi = w + i * f->taps, total = 0.0;
        for (int64_t j = 0; j < n; j++) {
            wi[j] = triangle((j + lo - center + 0.5) * invscale);
            total += wi[j];
        }
        for (int64_t j = 0; j < n; j++) {
            if (total != 0.0) wi[j] /= total;
            if (wi[j] > w_max) w_max = wi[j];
        }
        f->start[i] = lo;
        f->count[i] = n;
    }
    int p = 0;
    for (p = 0; p < 22; p++)
        if ((int)(0.5 + w_max * (1 << (p + 1))) >= (1 << 15)) break;
    f->precision = p;
    for (int64_t i = 0; i < out_size; i++)
        for (int64_t j = 0; j < f->count[i]; j++) {
            double v = w[i * f->taps + j] * (1 << p);
            f->weight[i * f->taps + j] = (int32_t)(int16_t)(v < 0 ? v - 0.5 : v + 0.5);
        }
    free(w);
    return 1;
}

static inline uint8_t clamp8(int32_t v, int precision) {
    v >>= precision;
    return (uint8_t)(v < 0 ? 0 : (v > 255 ? 255 : v));
}

/* One row, horizontally, output by output, each tap's three bytes read as such: crops narrower
 * than the filter, the rows at the end of the image's memory (which a wider load would overrun),
 * and the outputs the vector paths leave. */
static void horizontal_scalar(const uint8_t *row, const filter_t *f, int64_t x0, int64_t x1, int64_t out_w,
                              int flip, uint8_t *restrict out) {
    const int32_t half = 1 << (f->precision - 1);
    for (int64_t x = x0; x < x1; x++) {
        const uint8_t *in = row + f->start[x] * 3;
        const int32_t *w = f->weight + x * f->taps;
        int32_t r = half, g = half, b = half;
        for (int64_t j = 0; j < f->count[x]; j++) {
            r += w[j] * in[3 * j];
            g += w[j] * in[3 * j + 1];
            b += w[j] * in[3 * j + 2];
        }
        uint8_t *o = out + (flip ? out_w - 1 - x : x) * 3;
        o[0] = clamp8(r, f->precision);
        o[1] = clamp8(g, f->precision);
        o[2] = clamp8(b, f->precision);
    }
}

/* The horizontal filter laid out for the vector paths: every output gets `taps` taps (zero
 * weights pad), its start moved left at the crop's right edge so that all of them are inside it. */
typedef struct {
    int64_t taps, out_w, groups;
    int precision;
    int32_t *offset;    /* per output: byte offset of its first tap in the row */
    int32_t *weight;    /* taps x out_w */
    /* Per group of 8 outputs: the taps its outputs use (up to the last non-zero weight: a filter's
     * `taps` is its widest case); for AVX-512 VBMI, where they span at most 128 bytes, per pair of
     * taps, two byte permutations of the 128 bytes from the group's first tap (r and g of the 8
     * outputs; b) and the pair's weights; fits[g] = 0 sends a group to the gathers. */
    uint8_t *used, *fits, *index;
    int32_t *pair_weight;
} hplan_t;

#define GROUP 8
#define WINDOW 128

static void hplan_free(hplan_t *h) {
    free(h->offset);
    free(h->weight);
    free(h->used);
    free(h->fits);
    free(h->index);
    free(h->pair_weight);
}

/* Returns 0 when out of memory. f->taps > in_size (a crop narrower than the filter): only the
 * scalar path runs, and the plan stays empty. */
static int hplan_make(const filter_t *f, int64_t in_size, int64_t out_w, hplan_t *h) {
    memset(h, 0, sizeof(*h));
    h->taps = f->taps, h->out_w = out_w, h->precision = f->precision;
    if (f->taps > in_size) return 1;
    const int64_t pairs = (f->taps + 1) / 2;
    h->groups = out_w / GROUP;
    h->offset = malloc(sizeof(int32_t) * out_w);
    h->weight = calloc(out_w * f->taps, sizeof(int32_t));
    h->used = calloc(h->groups + 1, 1);
    h->fits = calloc(h->groups + 1, 1);
    h->index = calloc((h->groups + 1) * pairs * 2 * 64, 1);
    h->pair_weight = calloc((h->groups + 1) * pairs * 16, sizeof(int32_t));
    if (!h->offset || !h->weight || !h->used || !h->fits || !h->index || !h->pair_weight) {
        hplan_free(h);
        return 0;
    }
    for (int64_t x = 0; x < out_w; x++) {
        int64_t s = f->start[x] + f->taps > in_size ? in_size - f->taps : f->start[x];
        h->offset[x] = (int32_t)(3 * s);
        for (int64_t j = 0; j < f->count[x]; j++)
            h->weight[(f->start[x] - s + j) * out_w + x] = f->weight[x * f->taps + j];
    }
    for (int64_t g = 0; g < h->groups; g++) {
        const int64_t x0 = g * GROUP;
        int64_t used = 1;
        for (int64_t x = x0; x < x0 + GROUP; x++)
            for (int64_t j = 0; j < f->taps; j++)
                if (h->weight[j * out_w + x] != 0 && j + 1 > used) used = j + 1;
        h->used[g] = (uint8_t)used;
        const int64_t used_pairs = (used + 1) / 2;
        /* the last tap's bytes of the last output, the padding tap's too */
        if (h->offset[x0 + GROUP - 1] + 3 * 2 * used_pairs - h->offset[x0] > WINDOW) continue;
        h->fits[g] = 1;
        for (int64_t p = 0; p < used_pairs; p++) {
            uint8_t *index = h->index + (g * pairs + p) * 2 * 64;
            int32_t *w = h->pair_weight + (g * pairs + p) * 16;
            for (int64_t lane = 0; lane < 16; lane++) {
                const int64_t x = x0 + lane % GROUP;
                for (int64_t k = 0; k < 2; k++) {  /* taps 2p and 2p + 1, as the low bytes of two int16 */
                    const int64_t j = 2 * p + k, at = h->offset[x] - h->offset[x0] + 3 * j;
                    index[lane * 4 + 2 * k] = (uint8_t)(at + (lane < GROUP ? 0 : 1));     /* r; g */
                    index[64 + lane * 4 + 2 * k] = (uint8_t)(at + 2);                     /* b */
                }
                const int32_t w0 = h->weight[(2 * p) * out_w + x];
                const int32_t w1 = 2 * p + 1 < f->taps ? h->weight[(2 * p + 1) * out_w + x] : 0;
                w[lane] = (int32_t)((uint32_t)w1 << 16 | (uint16_t)w0);
            }
        }
    }
    return 1;
}

#if defined(__AVX512VBMI__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define HAVE_PERMUTE_PATH 1
/* 8 outputs from the 128 bytes at `window` (its first `valid` bytes inside the row): two byte
 * permutations per pair of taps put each tap's byte into the low half of an int16, two
 * multiply-adds sum the pair; r and g share a register, b has one. */
static inline void horizontal_group(const uint8_t *window, int64_t valid, const hplan_t *h, int64_t g,
                                    int flip, uint8_t *out) {
    const int64_t pairs = (h->taps + 1) / 2;
    const __mmask64 lo_mask = valid >= 64 ? ~(__mmask64)0 : (((__mmask64)1 << valid) - 1);
    const __mmask64 hi_mask = valid >= 128 ? ~(__mmask64)0 : valid <= 64 ? 0 : (((__mmask64)1 << (valid - 64)) - 1);
    const __m512i lo = _mm512_maskz_loadu_epi8(lo_mask, window), hi = _mm512_maskz_loadu_epi8(hi_mask, window + 64);
    const __mmask64 low_bytes = 0x5555555555555555ULL;
    __m512i rg = _mm512_set1_epi32(1 << (h->precision - 1)), b = rg;
    const uint8_t *index = h->index + g * pairs * 2 * 64;
    const int32_t *weight = h->pair_weight + g * pairs * 16;
    for (int64_t p = 0; p < (h->used[g] + 1) / 2; p++, index += 128, weight += 16) {
        const __m512i w = _mm512_loadu_si512(weight);
        const __m512i x_rg = _mm512_maskz_permutex2var_epi8(low_bytes, lo, _mm512_loadu_si512(index), hi);
        const __m512i x_b = _mm512_maskz_permutex2var_epi8(low_bytes, lo, _mm512_loadu_si512(index + 64), hi);
#ifdef __AVX512VNNI__
        rg = _mm512_dpwssd_epi32(rg, x_rg, w);
        b = _mm512_dpwssd_epi32(b, x_b, w);
#else
        rg = _mm512_add_epi32(rg, _mm512_madd_epi16(x_rg, w));
        b = _mm512_add_epi32(b, _mm512_madd_epi16(x_b, w));
#endif
    }
    /* >> precision, saturated to bytes: r0..r7 g0..g7 and b0..b7, then interleaved (mirrored). */
    const __m128i v_rg = _mm512_cvtusepi32_epi8(_mm512_srai_epi32(rg, h->precision));
    const __m128i v_b = _mm512_cvtusepi32_epi8(_mm512_srai_epi32(b, h->precision));
    const __m256i both = _mm256_inserti128_si256(_mm256_castsi128_si256(v_rg), v_b, 1);
    static const uint8_t order[2][32] = {
        {0, 8, 16, 1, 9, 17, 2, 10, 18, 3, 11, 19, 4, 12, 20, 5, 13, 21, 6, 14, 22, 7, 15, 23},
        {7, 15, 23, 6, 14, 22, 5, 13, 21, 4, 12, 20, 3, 11, 19, 2, 10, 18, 1, 9, 17, 0, 8, 16}};
    const __m256i pixels = _mm256_permutexvar_epi8(_mm256_loadu_si256((const __m256i *)order[flip]), both);
    _mm256_mask_storeu_epi8(out, 0xFFFFFF, pixels);
}
#endif

/* rows [y0, y1) of the crop, horizontally: src (3 channels interleaved, row stride `stride`
 * bytes, the crop's first pixel at src; the image's memory ends at `end`) -> dst (rows of out_w
 * pixels), mirrored when flip. Groups of 8 outputs go through byte permutations where the CPU has
 * them and their taps fit (horizontal_group), else through gathers of one four-byte load per
 * output and tap (a pixel's three channels). acc: 3 x out_w. */
static void horizontal(const uint8_t *src, int64_t stride, int64_t y0, int64_t y1, const filter_t *f,
                       const hplan_t *h, int64_t in_w, int64_t out_w, int flip, const uint8_t *end,
                       int32_t *restrict acc, uint8_t *restrict dst) {
    const int32_t half = 1 << (f->precision - 1);
    int32_t *restrict r = acc, *restrict g = acc + out_w, *restrict b = acc + 2 * out_w;
    for (int64_t y = y0; y < y1; y++) {
        const uint8_t *row = src + y * stride;
        uint8_t *restrict out = dst + (y - y0) * out_w * 3;
        if (h->taps > in_w) {
            horizontal_scalar(row, f, 0, out_w, out_w, flip, out);
            continue;
        }
        const int gathers_fit = row + in_w * 3 + 1 <= end;  /* a four-byte load at the last pixel */
        for (int64_t grp = 0; grp < h->groups; grp++) {
            const int64_t x0 = grp * GROUP;
#ifdef HAVE_PERMUTE_PATH
            if (h->fits[grp]) {
                horizontal_group(row + h->offset[x0], in_w * 3 - h->offset[x0], h, grp, flip,
                                 out + (flip ? out_w - x0 - GROUP : x0) * 3);
                continue;
            }
#endif
            if (!gathers_fit) {
                horizontal_scalar(row, f, x0, x0 + GROUP, out_w, flip, out);
                continue;
            }
#ifdef __AVX2__
            const __m256i low = _mm256_set1_epi32(255);
            __m256i idx = _mm256_loadu_si256((const __m256i *)(h->offset + x0));
            __m256i vr = _mm256_set1_epi32(half), vg = vr, vb = vr;
            for (int64_t j = 0; j < h->used[grp]; j++) {
                __m256i px = _mm256_i32gather_epi32((const int *)(row + j * 3), idx, 1);
                __m256i w = _mm256_loadu_si256((const __m256i *)(h->weight + j * out_w + x0));
                vr = _mm256_add_epi32(vr, _mm256_madd_epi16(_mm256_and_si256(px, low), w));
                vg = _mm256_add_epi32(vg, _mm256_madd_epi16(_mm256_and_si256(_mm256_srli_epi32(px, 8), low), w));
                vb = _mm256_add_epi32(vb, _mm256_madd_epi16(_mm256_and_si256(_mm256_srli_epi32(px, 16), low), w));
            }
            _mm256_storeu_si256((__m256i *)(r + x0), vr);
            _mm256_storeu_si256((__m256i *)(g + x0), vg);
            _mm256_storeu_si256((__m256i *)(b + x0), vb);
#else
            for (int64_t x = x0; x < x0 + GROUP; x++) {
                int32_t vr = half, vg = half, vb = half;
                for (int64_t j = 0; j < h->used[grp]; j++) {
                    const uint8_t *px = row + j * 3 + h->offset[x];
                    const int32_t w = h->weight[j * out_w + x];
                    vr += w * px[0], vg += w * px[1], vb += w * px[2];
                }
                r[x] = vr, g[x] = vg, b[x] = vb;
            }
#endif
            for (int64_t x = x0; x < x0 + GROUP; x++) {
                uint8_t *px = out + (flip ? out_w - 1 - x : x) * 3;
                px[0] = clamp8(r[x], f->precision);
                px[1] = clamp8(g[x], f->precision);
                px[2] = clamp8(b[x], f->precision);
            }
        }
        horizontal_scalar(row, f, h->groups * GROUP, out_w, out_w, flip, out);
    }
}

/* The vertical pass: rows of `width` bytes in src (row stride `stride`, row 0 = input row `first`). */
static void vertical(const uint8_t *src, int64_t stride, int64_t first, const filter_t *f, int64_t out_h,
                     int64_t width, int32_t *restrict acc, uint8_t *restrict dst) {
    const int32_t half = 1 << (f->precision - 1);
    for (int64_t y = 0; y < out_h; y++) {
        const int32_t *w = f->weight + y * f->taps;
        const uint8_t *rows = src + (f->start[y] - first) * stride;
        const int64_t n = f->count[y];
        uint8_t *out = dst + y * width;
        int64_t k = 0;
#ifdef __AVX512BW__
        /* Two rows per multiply-add: their bytes widened and interleaved, times (w_j, w_j+1). */
        for (; k + 32 <= width; k += 32) {
            __m512i lo = _mm512_set1_epi32(half), hi = lo;
            for (int64_t j = 0; j < n; j += 2) {
                __m512i a = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)(rows + j * stride + k)));
                __m512i b = j + 1 < n ? _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)(rows + (j + 1) * stride + k)))
                                      : _mm512_setzero_si512();
                int32_t w1 = j + 1 < n ? w[j + 1] : 0;
                __m512i wp = _mm512_set1_epi32((int32_t)((uint32_t)w1 << 16 | (uint16_t)w[j]));
                lo = _mm512_add_epi32(lo, _mm512_madd_epi16(_mm512_unpacklo_epi16(a, b), wp));
                hi = _mm512_add_epi32(hi, _mm512_madd_epi16(_mm512_unpackhi_epi16(a, b), wp));
            }
            /* unpack and pack both work within 128-bit lanes: the int16s come back in order. */
            __m512i v = _mm512_packs_epi32(_mm512_srai_epi32(lo, f->precision), _mm512_srai_epi32(hi, f->precision));
            _mm256_storeu_si256((__m256i *)(out + k), _mm512_cvtusepi16_epi8(v));
        }
#endif
#ifdef __AVX2__
        for (; k + 16 <= width; k += 16) {
            __m256i lo = _mm256_set1_epi32(half), hi = lo;
            for (int64_t j = 0; j < n; j += 2) {
                __m256i a = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)(rows + j * stride + k)));
                __m256i b = j + 1 < n ? _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)(rows + (j + 1) * stride + k)))
                                      : _mm256_setzero_si256();
                int32_t w1 = j + 1 < n ? w[j + 1] : 0;
                __m256i wp = _mm256_set1_epi32((int32_t)((uint32_t)w1 << 16 | (uint16_t)w[j]));
                lo = _mm256_add_epi32(lo, _mm256_madd_epi16(_mm256_unpacklo_epi16(a, b), wp));
                hi = _mm256_add_epi32(hi, _mm256_madd_epi16(_mm256_unpackhi_epi16(a, b), wp));
            }
            /* unpack and pack both work within 128-bit lanes: the bytes come back in order. */
            __m256i v = _mm256_packs_epi32(_mm256_srai_epi32(lo, f->precision), _mm256_srai_epi32(hi, f->precision));
            v = _mm256_permute4x64_epi64(_mm256_packus_epi16(v, v), 0x08);
            _mm_storeu_si128((__m128i *)(out + k), _mm256_castsi256_si128(v));
        }
#endif
        if (k < width) {
            for (int64_t i = k; i < width; i++) acc[i] = half;
            for (int64_t j = 0; j < n; j++) {
                const uint8_t *restrict in = rows + j * stride;
                const int32_t wj = w[j];
                for (int64_t i = k; i < width; i++) acc[i] += wj * in[i];
            }
            for (int64_t i = k; i < width; i++) out[i] = clamp8(acc[i], f->precision);
        }
    }
}

static void mirror_rows(const uint8_t *src, int64_t stride, int64_t rows, int64_t w, uint8_t *dst) {
    for (int64_t y = 0; y < rows; y++)
        for (int64_t x = 0; x < w; x++)
            memcpy(dst + (y * w + (w - 1 - x)) * 3, src + y * stride + x * 3, 3);
}

/* One image: src is the crop's first pixel (3 interleaved channels, row stride `stride` bytes;
 * the image's memory ends at `end`), crop_h x crop_w -> out_h x out_w x 3 at dst.
 * Returns 0 when out of memory. */
static int crop_one(const uint8_t *src, int64_t stride, const uint8_t *end, int64_t crop_h, int64_t crop_w,
                    int flip, int64_t out_h, int64_t out_w, uint8_t *dst) {
    int ok = 0;
    filter_t fx = {0}, fy = {0};
    hplan_t hx = {0};
    uint8_t *rows = NULL;
    int32_t *acc = NULL;
    int need_x = crop_w != out_w, need_y = crop_h != out_h;
    if ((need_x && !(filter_make(&fx, crop_w, out_w) && hplan_make(&fx, crop_w, out_w, &hx))) ||
        (need_y && !filter_make(&fy, crop_h, out_h)))
        goto done;
    acc = malloc(sizeof(int32_t) * out_w * 3);
    if (!acc) goto done;
    /* The input rows the vertical pass reads; all of them when there is none. */
    int64_t y0 = need_y ? fy.start[0] : 0;
    int64_t y1 = need_y ? fy.start[out_h - 1] + fy.count[out_h - 1] : crop_h;
    const uint8_t *from = src + y0 * stride;  /* row y0 of the crop, after the horizontal pass */
    int64_t from_stride = stride;
    if (need_x || flip) {
        uint8_t *target = need_y ? NULL : dst;
        if (!target) {
            rows = malloc((size_t)(y1 - y0) * out_w * 3);
            if (!rows) goto done;
            target = rows;
        }
        if (need_x)
            horizontal(src, stride, y0, y1, &fx, &hx, crop_w, out_w, flip, end, acc, target);
        else
            mirror_rows(src + y0 * stride, stride, y1 - y0, out_w, target);
        from = target;
        from_stride = out_w * 3;
    }
    if (need_y)
        vertical(from, from_stride, y0, &fy, out_h, out_w * 3, acc, dst);
    else if (!(need_x || flip))
        for (int64_t y = 0; y < out_h; y++) memcpy(dst + y * out_w * 3, from + y * from_stride, out_w * 3);
    ok = 1;
done:
    filter_free(&fx);
    hplan_free(&hx);
    filter_free(&fy);
    free(rows);
    free(acc);
    return ok;
}

/* dst[k] = (src[k] - mean[k % 3]) * inv_std[k % 3] in fp32, as torch computes the preset's
 * normalize (a subtraction, then a multiplication, each rounded). 48 values, 16 pixels, at a time:
 * the channel pattern repeats, and the compiler vectorizes the fixed-length inner loop. */
static void normalize(const uint8_t *restrict src, int64_t count, const float *norm, float *restrict dst) {
    float mean[48], inv_std[48];
    for (int i = 0; i < 48; i++) mean[i] = norm[i % 3], inv_std[i] = norm[3 + i % 3];
    int64_t k = 0;
    for (; k + 48 <= count; k += 48)
        for (int i = 0; i < 48; i++) dst[k + i] = ((float)src[k + i] - mean[i]) * inv_std[i];
    for (; k < count; k++) dst[k] = ((float)src[k] - mean[k % 3]) * inv_std[k % 3];
}

/* n images, row i of meta (row stride meta_stride) = the image's first pixel (3 interleaved
 * channels), its rows, its columns, its row stride in bytes, then its box: top, left, height,
 * width; mirrored when flips[i]. out holds n images of out_h x out_w x 3: uint8, or with norm
 * (mean x 255 and 1 / (std x 255) of the 3 channels) float, normalized. Returns 0; -1 - i when
 * image i's box is not inside it; 1 + i when memory ran out for image i. */
int imgcls_crop_resize(int64_t n, const int64_t *meta, int64_t meta_stride, const uint8_t *flips,
                       int64_t out_h, int64_t out_w, const float *norm, void *out) {
    for (int64_t i = 0; i < n; i++) {
        const int64_t *m = meta + i * meta_stride, *b = m + 4;
        if (b[0] < 0 || b[1] < 0 || b[2] < 1 || b[3] < 1 || b[0] + b[2] > m[1] || b[1] + b[3] > m[2] ||
            m[3] < m[2] * 3)
            return (int)(-1 - i);
    }
    const int64_t size = out_h * out_w * 3;
    int failed = 0;
#pragma omp parallel
    {
        /* each thread's uint8 image, normalized from there into out */
        uint8_t *mine = norm ? malloc((size_t)size) : NULL;
#pragma omp for schedule(dynamic, 1)
        for (int64_t i = 0; i < n; i++) {
            const int64_t *m = meta + i * meta_stride, *b = m + 4;
            const uint8_t *base = (const uint8_t *)(intptr_t)m[0];
            const uint8_t *end = base + (m[1] - 1) * m[3] + m[2] * 3;
            uint8_t *dst = norm ? mine : (uint8_t *)out + i * size;
            if (!dst || !crop_one(base + b[0] * m[3] + b[1] * 3, m[3], end, b[2], b[3], flips[i], out_h, out_w, dst)) {
#pragma omp critical
                if (!failed || i + 1 < failed) failed = (int)(i + 1);
                continue;
            }
            if (norm) normalize(dst, size, norm, (float *)out + i * size);
        }
        free(mine);
    }
    return failed;
}

/* The vector paths this build has: 1, the horizontal pass's byte permutations (AVX-512 VBMI);
 * 2, its gathers and the vertical pass's multiply-adds (AVX2). */
int imgcls_crop_resize_paths(void) {
    int paths = 0;
#ifdef HAVE_PERMUTE_PATH
    paths |= 1;
#endif
#ifdef __AVX2__
    paths |= 2;
#endif
    return paths;
}
