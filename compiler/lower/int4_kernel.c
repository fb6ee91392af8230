// skiptree's int4 x int8 matmul for the TVM backend: y[M][N] = x[M][K] . W[N][K]^T, W symmetric int4.
//
// Batch-invariant: a row's output is bit-identical whether the call has 1 row or 64, so a
// speculative verify step (several rows) and a plain decode step (one row) compute the same model.
// Every row runs the same instruction sequence whatever the row count (rows are tiled, and a row's
// arithmetic never depends on its neighbours); threads split the output columns, never a row's sum.
// (ORT's MatMulNBits sends one-row calls to a different kernel: bench/results/matmulnbits_rows.md.)
//
// Weights: codes q in 0..15 (value (q - 8) * d), blocks of 32 along k, stored [N][K/32][16] bytes
// (byte j: element j in the low nibble, j + 16 in the high one), one float scale d per block.
// Activations: int8 with one scale per block of 32 (max |x| / 127), as MLAS quantises them.
// A block's integer dot product is exact: sum_j q * xq - 8 * sum_j xq (vpmaddubsw takes the
// unsigned codes and the signed activations); blocks are taken two at a time (one 32-byte load of
// codes; the activations are stored in the order of its nibbles), accumulated in float per lane in
// block order, and the lanes summed in a fixed order. Needs K % 64 == 0 and AVX2 + FMA.
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#define BLOCK 32
#define ROW_TILE 8

typedef struct {
    void *sync_handle;
    int32_t num_task;
} TVMParallelGroupEnv;
typedef int (*FTVMParallelLambda)(int task_id, TVMParallelGroupEnv *penv, void *cdata);
int TVMBackendParallelLaunch(FTVMParallelLambda flambda, void *cdata, int num_task);  // libtvm_runtime

// Where element j of a block pair's 64 stored activations comes from (p: the pair's first k): the
// order [A0..15, B0..15, A16..31, B16..31] matches the nibbles of a 32-byte load of both blocks.
static inline int paired_source(int p, int j) {
    int half = j / BLOCK, within = j % BLOCK, block = within / 16;
    return p + block * BLOCK + half * 16 + within % 16;
}

// One row -> int8 codes in the paired order, and per block pair 8 int32 offsets (8 * sum(xq) of
// block A in lane 0 and of block B in lane 4: vpmaddwd leaves A's partial sums in lanes 0-3 and
// B's in 4-7) and 8 scales [xs_A x4, xs_B x4].
static void quantize_row(int K, const float *x, int8_t *xq, int32_t *offsets, float *xs) {
    for (int p = 0; p < K; p += 2 * BLOCK) {
        float scale[2], inverse[2];
        int sums[2] = {0, 0};
        for (int block = 0; block < 2; block++) {
            float peak = 0.0f;
            for (int k = 0; k < BLOCK; k++) peak = fmaxf(peak, fabsf(x[p + block * BLOCK + k]));
            scale[block] = peak > 0.0f ? peak / 127.0f : 1.0f;
            inverse[block] = 1.0f / scale[block];
        }
        for (int j = 0; j < 2 * BLOCK; j++) {
            int source = paired_source(p, j), block = (source - p) / BLOCK;
            int q = (int)lrintf(x[source] * inverse[block]);
            xq[p + j] = (int8_t)q;
            sums[block] += q;
        }
        int pair = p / (2 * BLOCK);
        for (int lane = 0; lane < 8; lane++) {
            int block = lane / 4;
            offsets[pair * 8 + lane] = lane % 4 == 0 ? 8 * sums[block] : 0;
            xs[pair * 8 + lane] = scale[block];
        }
    }
}

static inline float sum_lanes(__m256 v) {
    __m128 low = _mm256_castps256_ps128(v), high = _mm256_extractf128_ps(v, 1);
    __m128 four = _mm_add_ps(low, high);
    __m128 two = _mm_add_ps(four, _mm_movehl_ps(four, four));
    return _mm_cvtss_f32(_mm_add_ss(two, _mm_shuffle_ps(two, two, 1)));
}

typedef struct {
    int M, K, N;
    const uint8_t *codes;
    const float *scales;
    const int8_t *xq;
    const int32_t *offsets;
    const float *xs;
    float *y;
} Problem;

// Output columns [n0, n1) for `rows` rows from m0 (a compile-time constant once inlined, so the
// accumulators stay in registers).
static inline __attribute__((always_inline)) void tile(const int rows, int m0, int n0, int n1, const Problem *p) {
    int K = p->K, N = p->N, blocks = K / BLOCK, pairs = blocks / 2;
    const __m256i low_nibbles = _mm256_set1_epi8(15), ones = _mm256_set1_epi16(1);
    for (int n = n0; n < n1; n++) {
        __m256 acc[ROW_TILE];
        for (int r = 0; r < rows; r++) acc[r] = _mm256_setzero_ps();
        const uint8_t *c = p->codes + (size_t)n * blocks * 16;
        const float *s = p->scales + (size_t)n * blocks;
        for (int b = 0; b < blocks; b += 2) {
            __m256i packed = _mm256_loadu_si256((const __m256i *)(c + b * 16));
            __m256i lo = _mm256_and_si256(packed, low_nibbles);
            __m256i hi = _mm256_and_si256(_mm256_srli_epi16(packed, 4), low_nibbles);
            __m256 scale = _mm256_set_m128(_mm_set1_ps(s[b + 1]), _mm_set1_ps(s[b]));
            int pair = b / 2;
            for (int r = 0; r < rows; r++) {
                size_t row = (size_t)(m0 + r);
                const int8_t *a = p->xq + row * K + b * BLOCK;
                __m256i sums = _mm256_add_epi16(_mm256_maddubs_epi16(lo, _mm256_loadu_si256((const __m256i *)a)),
                                                _mm256_maddubs_epi16(hi, _mm256_loadu_si256((const __m256i *)(a + 32))));
                __m256i dots = _mm256_sub_epi32(_mm256_madd_epi16(sums, ones),
                                                _mm256_loadu_si256((const __m256i *)(p->offsets + (row * pairs + pair) * 8)));
                __m256 both = _mm256_mul_ps(scale, _mm256_loadu_ps(p->xs + (row * pairs + pair) * 8));
                acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dots), both, acc[r]);
            }
        }
        for (int r = 0; r < rows; r++) p->y[(size_t)(m0 + r) * N + n] = sum_lanes(acc[r]);
    }
}

static void columns(const Problem *p, int n0, int n1) {
    int M = p->M;
    for (int m0 = 0; m0 < M; m0 += ROW_TILE) {
        switch (M - m0 < ROW_TILE ? M - m0 : ROW_TILE) {
            case 1: tile(1, m0, n0, n1, p); break;
            case 2: tile(2, m0, n0, n1, p); break;
            case 3: tile(3, m0, n0, n1, p); break;
            case 4: tile(4, m0, n0, n1, p); break;
            case 5: tile(5, m0, n0, n1, p); break;
            case 6: tile(6, m0, n0, n1, p); break;
            case 7: tile(7, m0, n0, n1, p); break;
            default: tile(ROW_TILE, m0, n0, n1, p); break;
        }
    }
}

static int column_task(int task, TVMParallelGroupEnv *env, void *data) {
    const Problem *p = (const Problem *)data;
    int per = (p->N + env->num_task - 1) / env->num_task;
    int n0 = task * per, n1 = n0 + per < p->N ? n0 + per : p->N;
    if (n0 < n1) columns(p, n0, n1);
    return 0;
}

// The scratch of the quantised activations, kept between calls (one per calling thread).
static __thread void *scratch = NULL;
static __thread size_t scratch_size = 0;

// threads: 1 runs on the calling thread, 0 on TVM's thread pool (split by output columns).
// Returns 0, or -1 when K is not a multiple of 64 or the scratch cannot be allocated.
int skiptree_int4_matmul(int M, int K, int N, const uint8_t *codes, const float *scales, const float *x,
                         float *y, int threads) {
    if (K % (2 * BLOCK) != 0) return -1;
    int pairs = K / (2 * BLOCK);
    size_t need = (size_t)M * K + 2 * (size_t)M * pairs * 8 * 4;
    if (need > scratch_size) {
        void *grown = realloc(scratch, need);
        if (grown == NULL) return -1;
        scratch = grown;
        scratch_size = need;
    }
    int8_t *xq = (int8_t *)scratch;
    int32_t *offsets = (int32_t *)(xq + (size_t)M * K);  // M * K is a multiple of 64: aligned
    float *xs = (float *)(offsets + (size_t)M * pairs * 8);
    for (int m = 0; m < M; m++)
        quantize_row(K, x + (size_t)m * K, xq + (size_t)m * K, offsets + (size_t)m * pairs * 8,
                     xs + (size_t)m * pairs * 8);
    Problem problem = {M, K, N, codes, scales, xq, offsets, xs, y};
    if (threads == 1 || N < 64) {
        columns(&problem, 0, N);
        return 0;
    }
    return TVMBackendParallelLaunch(column_task, &problem, threads);
}
