// Batch-invariant int4 x int8 matmuls for AVX2, the candidate kernels of bench/int4_kernel.py:
// int4_matmul (one block a step), int4_matmul_paired (two blocks a step), both with one activation
// scale per row; int4_matmul_blocks (two blocks a step, one activation scale per block of 32, as
// MLAS quantises) and int4_matmul_blocks2 (the same, two output columns a pass). The first is
// described here; the others say what they change.
//
// y[m][n] = xs[m] * sum_b s[n][b] * sum_j (q[n][b][j] - 8) * xq[m][b][j]
//
// Weights: symmetric int4 codes q in 0..15 (zero point 8), block 32 along k, stored [N][K/32][16]
// bytes (byte j holds element j in its low nibble and element j + 16 in its high one), one float
// scale per block. Activations: int8 with one scale per row (max |x| / 127), kept unsigned
// (xq + 128) for vpmaddubsw, whose bias is removed at the end with a per-output constant:
// sum_j (q - 8) * (xq + 128) = sum_j (q - 8) * xq + 128 * sum_j (q - 8).
// Every row runs the same instruction sequence whatever the row count (rows are tiled by 8, and a
// row's arithmetic never depends on its neighbours), so a row's output is bit-identical alone or
// in a batch: what a lossless speculative verify step needs. A block's int32 dot product is exact;
// the float accumulation across blocks is in block order, per lane, then the lanes are summed in
// a fixed order.
#include <immintrin.h>
#include <math.h>
#include <stdint.h>

#define BLOCK 32
#define ROW_TILE 8

// Per output: sum_b s[n][b] * sum_j (q - 8): the constant that removes the +128 of the activations.
void int4_bias(int K, int N, const uint8_t *codes, const float *scales, float *bias) {
    int blocks = K / BLOCK;
    for (int n = 0; n < N; n++) {
        float total = 0.0f;
        for (int b = 0; b < blocks; b++) {
            const uint8_t *c = codes + ((size_t)n * blocks + b) * 16;
            int sum = 0;
            for (int j = 0; j < 16; j++) sum += (c[j] & 15) + (c[j] >> 4) - 16;
            total += scales[(size_t)n * blocks + b] * (float)sum;
        }
        bias[n] = total;
    }
}

// Row m of x -> unsigned int8 codes xq + 128 and the row's scale.
static void quantize_row(int K, const float *x, uint8_t *xu, float *xs) {
    float peak = 0.0f;
    for (int k = 0; k < K; k++) peak = fmaxf(peak, fabsf(x[k]));
    float scale = peak > 0.0f ? peak / 127.0f : 1.0f;
    float inverse = 1.0f / scale;
    for (int k = 0; k < K; k++) xu[k] = (uint8_t)((int)lrintf(x[k] * inverse) + 128);
    *xs = scale;
}

static inline float sum_lanes(__m256 v) {
    __m128 low = _mm256_castps256_ps128(v), high = _mm256_extractf128_ps(v, 1);
    __m128 four = _mm_add_ps(low, high);
    __m128 two = _mm_add_ps(four, _mm_movehl_ps(four, four));
    return _mm_cvtss_f32(_mm_add_ss(two, _mm_shuffle_ps(two, two, 1)));
}

// Runs tile_fn(rows, m0, ...) over the tiles of up to `limit` rows of an M-row call, `rows` a
// compile-time constant in each case (never above `limit`), so a tile's accumulators stay in registers.
#define AT_MOST(n, limit) ((n) < (limit) ? (n) : (limit))
#define FOR_EACH_TILE(limit, tile_fn, ...)                                           \
    for (int m0 = 0; m0 < M; m0 += (limit)) {                                        \
        switch (M - m0 < (limit) ? M - m0 : (limit)) {                               \
            case 1: tile_fn(1, m0, __VA_ARGS__); break;                              \
            case 2: tile_fn(AT_MOST(2, limit), m0, __VA_ARGS__); break;              \
            case 3: tile_fn(AT_MOST(3, limit), m0, __VA_ARGS__); break;              \
            case 4: tile_fn(AT_MOST(4, limit), m0, __VA_ARGS__); break;              \
            case 5: tile_fn(AT_MOST(5, limit), m0, __VA_ARGS__); break;              \
            case 6: tile_fn(AT_MOST(6, limit), m0, __VA_ARGS__); break;              \
            case 7: tile_fn(AT_MOST(7, limit), m0, __VA_ARGS__); break;              \
            default: tile_fn(limit, m0, __VA_ARGS__); break;                         \
        }                                                                            \
    }

// Where element j of a block pair's 64 stored activations comes from (p: the pair's first k): the
// order [A0..15, B0..15, A16..31, B16..31] matches the nibbles of a 32-byte load of both blocks.
static inline int paired_source(int p, int j) {
    int half = j / BLOCK, within = j % BLOCK, block = within / 16;
    return p + block * BLOCK + half * 16 + within % 16;
}

// One tile of `rows` rows (a compile-time constant once inlined: the accumulators stay in registers).
static inline __attribute__((always_inline)) void tile(const int rows, int m0, int K, int N, const uint8_t *codes,
                                                       const float *scales, const float *bias,
                                                       const uint8_t *xu, const float *xs, float *y) {
    int blocks = K / BLOCK;
    const __m128i low_nibbles = _mm_set1_epi8(15);
    const __m256i eight = _mm256_set1_epi8(8), ones = _mm256_set1_epi16(1);
    for (int n = 0; n < N; n++) {
        __m256 acc[ROW_TILE];
        for (int r = 0; r < rows; r++) acc[r] = _mm256_setzero_ps();
        const uint8_t *c = codes + (size_t)n * blocks * 16;
        const float *s = scales + (size_t)n * blocks;
        for (int b = 0; b < blocks; b++) {
            __m128i packed = _mm_loadu_si128((const __m128i *)(c + b * 16));
            __m128i lo = _mm_and_si128(packed, low_nibbles);
            __m128i hi = _mm_and_si128(_mm_srli_epi16(packed, 4), low_nibbles);
            __m256i w = _mm256_sub_epi8(_mm256_set_m128i(hi, lo), eight);  // q - 8, signed
            __m256 scale = _mm256_set1_ps(s[b]);
            for (int r = 0; r < rows; r++) {
                __m256i a = _mm256_loadu_si256((const __m256i *)(xu + (size_t)(m0 + r) * K + b * BLOCK));
                __m256i pairs = _mm256_maddubs_epi16(a, w);  // |sum| <= 2 * 255 * 8: no saturation
                __m256i dots = _mm256_madd_epi16(pairs, ones);
                acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dots), scale, acc[r]);
            }
        }
        for (int r = 0; r < rows; r++)
            y[(size_t)(m0 + r) * N + n] = xs[m0 + r] * (sum_lanes(acc[r]) - 128.0f * bias[n]);
    }
}

// x [M][K] float -> y [M][N]; xu [M][K] and xs [M] are scratch.
void int4_matmul(int M, int K, int N, const uint8_t *codes, const float *scales, const float *bias,
                 const float *x, float *y, uint8_t *xu, float *xs) {
    for (int m = 0; m < M; m++) quantize_row(K, x + (size_t)m * K, xu + (size_t)m * K, xs + m);
    FOR_EACH_TILE(ROW_TILE, tile, K, N, codes, scales, bias, xu, xs, y)
}

// The same product with two blocks a step: one 32-byte load holds blocks b and b + 1, whose low
// nibbles are [b 0..15 | b+1 0..15] and high ones [b 16..31 | b+1 16..31]; the activations of a
// block pair are stored in that order (`quantize_row_paired`), so no lane shuffles are needed, and
// a row costs 2 vpmaddubsw + vpaddw + vpmaddwd + convert + fma per 64 weights. Needs K / 32 even.
static void quantize_row_paired(int K, const float *x, uint8_t *xu, float *xs) {
    float peak = 0.0f;
    for (int k = 0; k < K; k++) peak = fmaxf(peak, fabsf(x[k]));
    float scale = peak > 0.0f ? peak / 127.0f : 1.0f;
    float inverse = 1.0f / scale;
    for (int p = 0; p < K; p += 2 * BLOCK)
        for (int j = 0; j < 2 * BLOCK; j++) {
            int source = paired_source(p, j);
            xu[p + j] = (uint8_t)((int)lrintf(x[source] * inverse) + 128);
        }
    *xs = scale;
}

static inline __attribute__((always_inline)) void tile_paired(const int rows, int m0, int K, int N,
                                                              const uint8_t *codes, const float *scales,
                                                              const float *bias, const uint8_t *xu,
                                                              const float *xs, float *y) {
    int blocks = K / BLOCK;
    const __m256i low_nibbles = _mm256_set1_epi8(15), eight = _mm256_set1_epi8(8);
    const __m256i ones = _mm256_set1_epi16(1);
    for (int n = 0; n < N; n++) {
        __m256 acc[ROW_TILE];
        for (int r = 0; r < rows; r++) acc[r] = _mm256_setzero_ps();
        const uint8_t *c = codes + (size_t)n * blocks * 16;
        const float *s = scales + (size_t)n * blocks;
        for (int b = 0; b < blocks; b += 2) {
            __m256i packed = _mm256_loadu_si256((const __m256i *)(c + b * 16));
            __m256i lo = _mm256_sub_epi8(_mm256_and_si256(packed, low_nibbles), eight);
            __m256i hi = _mm256_sub_epi8(_mm256_and_si256(_mm256_srli_epi16(packed, 4), low_nibbles), eight);
            __m256 scale = _mm256_set_m128(_mm_set1_ps(s[b + 1]), _mm_set1_ps(s[b]));
            for (int r = 0; r < rows; r++) {
                const uint8_t *a = xu + (size_t)(m0 + r) * K + b * BLOCK;
                __m256i pairs = _mm256_add_epi16(_mm256_maddubs_epi16(_mm256_loadu_si256((const __m256i *)a), lo),
                                                 _mm256_maddubs_epi16(_mm256_loadu_si256((const __m256i *)(a + 32)), hi));
                __m256i dots = _mm256_madd_epi16(pairs, ones);  // |i16| <= 4 * 255 * 8: no saturation
                acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dots), scale, acc[r]);
            }
        }
        for (int r = 0; r < rows; r++)
            y[(size_t)(m0 + r) * N + n] = xs[m0 + r] * (sum_lanes(acc[r]) - 128.0f * bias[n]);
    }
}

void int4_matmul_paired(int M, int K, int N, const uint8_t *codes, const float *scales, const float *bias,
                        const float *x, float *y, uint8_t *xu, float *xs) {
    for (int m = 0; m < M; m++) quantize_row_paired(K, x + (size_t)m * K, xu + (size_t)m * K, xs + m);
    FOR_EACH_TILE(ROW_TILE, tile_paired, K, N, codes, scales, bias, xu, xs, y)
}

// The paired kernel with one activation scale per block of 32 (as MLAS's int8 path quantises
// activations) instead of per row: the activations stay signed, the weights' codes go in unsigned
// (0..15, no subtraction), and the zero point's term -8 * sum(xq) of each block is subtracted from
// the block's integer dot product. Per row and block pair it stores 8 int32 offsets (8 sum(xq) of
// block A in lane 0 and of block B in lane 4: vpmaddwd leaves A's partial sums in lanes 0-3 and
// B's in 4-7) and 8 scales [xs_A x4, xs_B x4].
static void quantize_row_blocks(int K, const float *x, int8_t *xq, int32_t *offsets, float *xs) {
    for (int p = 0; p < K; p += 2 * BLOCK) {
        float scale[2];
        int sums[2] = {0, 0};
        for (int block = 0; block < 2; block++) {
            float peak = 0.0f;
            for (int k = 0; k < BLOCK; k++) peak = fmaxf(peak, fabsf(x[p + block * BLOCK + k]));
            scale[block] = peak > 0.0f ? peak / 127.0f : 1.0f;
        }
        for (int j = 0; j < 2 * BLOCK; j++) {
            int source = paired_source(p, j), block = (source - p) / BLOCK;
            int q = (int)lrintf(x[source] / scale[block]);
            xq[p + j] = (int8_t)q;
            sums[block] += q;
        }
        int pair = p / (2 * BLOCK);
        for (int lane = 0; lane < 8; lane++) {  // a block's dot product is the sum of its 4 lanes
            int block = lane / 4;
            offsets[pair * 8 + lane] = lane % 4 == 0 ? 8 * sums[block] : 0;
            xs[pair * 8 + lane] = scale[block];
        }
    }
}

static inline __attribute__((always_inline)) void tile_blocks(const int rows, int m0, int K, int N,
                                                              const uint8_t *codes, const float *scales,
                                                              const int8_t *xq, const int32_t *offsets,
                                                              const float *xs, float *y) {
    int blocks = K / BLOCK, pairs = blocks / 2;
    const __m256i low_nibbles = _mm256_set1_epi8(15), ones = _mm256_set1_epi16(1);
    for (int n = 0; n < N; n++) {
        __m256 acc[ROW_TILE];
        for (int r = 0; r < rows; r++) acc[r] = _mm256_setzero_ps();
        const uint8_t *c = codes + (size_t)n * blocks * 16;
        const float *s = scales + (size_t)n * blocks;
        for (int b = 0; b < blocks; b += 2) {
            __m256i packed = _mm256_loadu_si256((const __m256i *)(c + b * 16));
            __m256i lo = _mm256_and_si256(packed, low_nibbles);
            __m256i hi = _mm256_and_si256(_mm256_srli_epi16(packed, 4), low_nibbles);
            __m256 scale = _mm256_set_m128(_mm_set1_ps(s[b + 1]), _mm_set1_ps(s[b]));
            int pair = b / 2;
            for (int r = 0; r < rows; r++) {
                size_t row = (size_t)(m0 + r);
                const int8_t *a = xq + row * K + b * BLOCK;
                __m256i sums = _mm256_add_epi16(_mm256_maddubs_epi16(lo, _mm256_loadu_si256((const __m256i *)a)),
                                                _mm256_maddubs_epi16(hi, _mm256_loadu_si256((const __m256i *)(a + 32))));
                __m256i dots = _mm256_sub_epi32(_mm256_madd_epi16(sums, ones),
                                                _mm256_loadu_si256((const __m256i *)(offsets + (row * pairs + pair) * 8)));
                __m256 both = _mm256_mul_ps(scale, _mm256_loadu_ps(xs + (row * pairs + pair) * 8));
                acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dots), both, acc[r]);
            }
        }
        for (int r = 0; r < rows; r++) y[(size_t)(m0 + r) * N + n] = sum_lanes(acc[r]);
    }
}

// offsets and xs: scratch of M * K / 64 * 8 each.
void int4_matmul_blocks(int M, int K, int N, const uint8_t *codes, const float *scales, const float *x, float *y,
                        int8_t *xq, int32_t *offsets, float *xs) {
    int pairs = K / (2 * BLOCK);
    for (int m = 0; m < M; m++)
        quantize_row_blocks(K, x + (size_t)m * K, xq + (size_t)m * K, offsets + (size_t)m * pairs * 8,
                            xs + (size_t)m * pairs * 8);
    FOR_EACH_TILE(ROW_TILE, tile_blocks, K, N, codes, scales, xq, offsets, xs, y)
}

// Every matmul of a model in turn (each its own weights, so a call streams a whole step's weights
// from memory as a decode step does): x_k [M][K_k] -> y_k [M][N_k].
// tile_blocks over two output columns at once (rows <= 4, the accumulators fit the 16 registers):
// a row's activations, offsets and scales are loaded once for both; each column's arithmetic is
// exactly tile_blocks' (the same operations in the same order), so results are bit-identical to it.
static inline __attribute__((always_inline)) void tile_blocks2(const int rows, int m0, int K, int N,
                                                               const uint8_t *codes, const float *scales,
                                                               const int8_t *xq, const int32_t *offsets,
                                                               const float *xs, float *y) {
    int blocks = K / BLOCK, pairs = blocks / 2;
    const __m256i low_nibbles = _mm256_set1_epi8(15), ones = _mm256_set1_epi16(1);
    for (int n = 0; n + 1 < N; n += 2) {
        __m256 acc[4][2];
        for (int r = 0; r < rows; r++) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
        for (int b = 0; b < blocks; b += 2) {
            __m256i lo[2], hi[2];
            __m256 scale[2];
            for (int col = 0; col < 2; col++) {
                const uint8_t *c = codes + (size_t)(n + col) * blocks * 16;
                const float *s = scales + (size_t)(n + col) * blocks;
                __m256i packed = _mm256_loadu_si256((const __m256i *)(c + b * 16));
                lo[col] = _mm256_and_si256(packed, low_nibbles);
                hi[col] = _mm256_and_si256(_mm256_srli_epi16(packed, 4), low_nibbles);
                scale[col] = _mm256_set_m128(_mm_set1_ps(s[b + 1]), _mm_set1_ps(s[b]));
            }
            int pair = b / 2;
            for (int r = 0; r < rows; r++) {
                size_t row = (size_t)(m0 + r);
                const int8_t *a = xq + row * K + b * BLOCK;
                __m256i first = _mm256_loadu_si256((const __m256i *)a);
                __m256i second = _mm256_loadu_si256((const __m256i *)(a + 32));
                __m256i offset = _mm256_loadu_si256((const __m256i *)(offsets + (row * pairs + pair) * 8));
                __m256 row_scale = _mm256_loadu_ps(xs + (row * pairs + pair) * 8);
                for (int col = 0; col < 2; col++) {
                    __m256i sums = _mm256_add_epi16(_mm256_maddubs_epi16(lo[col], first),
                                                    _mm256_maddubs_epi16(hi[col], second));
                    __m256i dots = _mm256_sub_epi32(_mm256_madd_epi16(sums, ones), offset);
                    __m256 both = _mm256_mul_ps(scale[col], row_scale);
                    acc[r][col] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dots), both, acc[r][col]);
                }
            }
        }
        for (int r = 0; r < rows; r++)
            for (int col = 0; col < 2; col++) y[(size_t)(m0 + r) * N + n + col] = sum_lanes(acc[r][col]);
    }
    if (N % 2) tile_blocks(rows, m0, K, N, codes, scales, xq, offsets, xs, y);  // (recomputes; even N here)
}

// int4_matmul_blocks with two columns a pass for tiles of up to 4 rows.
void int4_matmul_blocks2(int M, int K, int N, const uint8_t *codes, const float *scales, const float *x,
                         float *y, int8_t *xq, int32_t *offsets, float *xs) {
    int pairs = K / (2 * BLOCK);
    for (int m = 0; m < M; m++)
        quantize_row_blocks(K, x + (size_t)m * K, xq + (size_t)m * K, offsets + (size_t)m * pairs * 8,
                            xs + (size_t)m * pairs * 8);
    FOR_EACH_TILE(4, tile_blocks2, K, N, codes, scales, xq, offsets, xs, y)
}

// kernel 0: int4_matmul, 1: _paired, 2: _blocks, 3: _blocks2 (scratch: xu, offsets, xs).
void int4_model(int count, const int *Ks, const int *Ns, const uint8_t **codes, const float **scales,
                const float **bias, const float **x, float **y, int M, uint8_t *xu, int32_t *offsets,
                float *xs, int kernel) {
    for (int i = 0; i < count; i++) {
        if (kernel >= 2)
            (kernel == 2 ? int4_matmul_blocks : int4_matmul_blocks2)(M, Ks[i], Ns[i], codes[i], scales[i], x[i],
                                                                     y[i], (int8_t *)xu, offsets, xs);
        else
            (kernel ? int4_matmul_paired : int4_matmul)(M, Ks[i], Ns[i], codes[i], scales[i], bias[i], x[i],
                                                        y[i], xu, xs);
    }
}
