/* kvc: inference for Llama-architecture models in one C file, built around the KV cache.

   Read it top to bottom, one concern a section: errors; the model (hyperparameters, weights); the
   tokenizer (vocabulary, pre-tokenizers, BPE, encoding and decoding); chat templates; file formats
   and loading (kvc files, llama2.c files, tokenizer.bin) with the Model they produce; kernels; the
   KV cache (one writer, one reader, typed row kernels); sequences (a cache plus the scratch its
   forward passes use); the forward pass; the sampler; the library API; and the command-line
   program with its generation loop. `main` and what only it uses are compiled out for the shared
   library (-DKVC_LIBRARY).

   A Model is read-only once open and shared; everything a running sequence writes lives in its
   Sequence. The forward pass reaches threads, SIMD and the cache only below forward_block: the
   seam a second backend implements.
*/
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <math.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

// ----------------------------------------------------------------------------
// Errors: library code never exits; it records one line and returns -1 (or NULL)

static _Thread_local char error_message[512];

static int fail(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(error_message, sizeof error_message, fmt, ap);
    va_end(ap);
    return -1;
}

const char *kvc_last_error(void) { return error_message; }

static void *alloc_zeroed(size_t count, size_t size) {
    void *p = calloc(count ? count : 1, size);
    if (!p) fail("out of memory allocating %zu x %zu bytes", count, size);
    return p;
}

static int thread_index(void) {
#ifdef _OPENMP
    return omp_get_thread_num();
#else
    return 0;
#endif
}

static int max_threads(void) {
#ifdef _OPENMP
    return omp_get_max_threads();
#else
    return 1;
#endif
}

// A clock in seconds: CLOCK_MONOTONIC for wall time, CLOCK_THREAD_CPUTIME_ID for the CPU time the
// calling thread has used (less than the wall time that passed while it was descheduled).
static double clock_seconds(clockid_t clock) {
    struct timespec ts;
    clock_gettime(clock, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

// ----------------------------------------------------------------------------
// The model: hyperparameters and weights

enum { WEIGHT_F32 = 0, WEIGHT_Q8_0 = 1, WEIGHT_Q4_0 = 2, WEIGHT_Q4_1 = 3 };
#define N_WEIGHT_TYPES 4
#define Q4_BLOCK 32   // values per q4_0 / q4_1 block: GGUF's, with one fp16 scale (and min) each
#define MAX_GROUP 4096 // the largest q8_0 group a file may ask for

static const char *const WEIGHT_TYPE_NAMES[N_WEIGHT_TYPES] = {"f32", "q8_0", "q4_0", "q4_1"};

typedef struct {
    int dim;               // residual stream width
    int hidden_dim;        // SwiGLU inner width
    int n_layers;
    int n_heads;           // query heads
    int n_kv_heads;        // key/value heads; n_heads is a multiple of it (GQA, MQA when 1)
    int head_dim;          // stored, not dim / n_heads: some models differ
    int vocab_size;
    int seq_len;           // the model's context length: a sequence's cache holds at most this many positions
    float rope_theta;
    float norm_eps;
    int shared_classifier; // the classifier reuses tok_embeddings
    int bos_id, eos_id;    // -1 when the model has none
} Config;

// How each weight matrix is stored (the norms are always fp32): a WEIGHT_* type per matrix, and
// the values per scale of the q8_0 ones.
typedef struct {
    int32_t group_size;    // q8_0 values per scale; 0 when no matrix is q8_0
    int32_t tok_embeddings, wq, wk, wv, wo, w1, w2, w3, wcls; // wcls: tok_embeddings' when shared
} WeightTypes;

// A weight matrix (rows x cols, row-major) in its type:
//   f32:  f, the values
//   q8_0: q, int8 values; scale, one fp32 scale per group_size values of a row (x = q scale)
//   q4_0: q4, 4-bit values two a byte in GGUF's order (byte j of a 32-value block holds value j in
//         its low nibble and value j + 16 in its high one); d, one fp16 scale per block (x = (q - 8) d)
//   q4_1: the same, plus m, one fp16 min per block (x = q d + m)
typedef struct {
    int type;              // WEIGHT_*
    int group_size;        // values per scale: q8_0's, Q4_BLOCK for q4
    const float *f;
    const int8_t *q;
    const float *scale;
    const uint8_t *q4;
    const uint16_t *d, *m; // m: q4_1 only
} Matrix;

// Layer tensors are stored type-major, (n_layers, rows, cols): matrix_at picks one layer's slice.
typedef struct {
    Matrix tok_embeddings;      // (vocab, dim)
    const float *rms_att;       // (layer, dim)
    Matrix wq, wk, wv, wo;      // (layer, q_dim, dim), (layer, kv_dim, dim) x2, (layer, dim, q_dim)
    const float *rms_ffn;       // (layer, dim)
    Matrix w1, w2, w3;          // (layer, hidden, dim), (layer, dim, hidden), (layer, hidden, dim)
    const float *rms_final;     // (dim)
    Matrix wcls;                // (vocab, dim)
    int input_group;            // values per scale of the int8 matmul inputs: every quantized matrix's
                                // group size (0: all matrices are f32)
    int input_sums;             // q4 matrices also take each input group's sum
    const float *key_mean;      // (layer, n_kv_heads, head_dim) the mean key after RoPE (take_key_mean), or NULL
} Weights;

static Matrix matrix_at(Matrix m, size_t index, size_t numel) {
    Matrix out = m;
    if (m.type == WEIGHT_F32) {
        out.f = m.f + index * numel;
        return out;
    }
    size_t groups = index * (numel / m.group_size);
    if (m.type == WEIGHT_Q8_0) {
        out.q = m.q + index * numel;
        out.scale = m.scale + groups;
    } else {
        out.q4 = m.q4 + index * numel / 2;
        out.d = m.d + groups;
        if (m.m) out.m = m.m + groups;
    }
    return out;
}

static int q_dim(const Config *p) { return p->n_heads * p->head_dim; }
static int kv_dim(const Config *p) { return p->n_kv_heads * p->head_dim; }

// Rejects every header value that would make the sizes below overflow or mean nothing.
static int check_config(const Config *p) {
    struct { const char *name; int value, max; } dims[] = {
        {"dim", p->dim, 1 << 16},           {"hidden_dim", p->hidden_dim, 1 << 18},
        {"n_layers", p->n_layers, 1024},    {"n_heads", p->n_heads, 1024},
        {"n_kv_heads", p->n_kv_heads, 1024}, {"head_dim", p->head_dim, 4096},
        {"vocab_size", p->vocab_size, 1 << 22}, {"seq_len", p->seq_len, 1 << 22},
    };
    for (size_t i = 0; i < sizeof dims / sizeof dims[0]; i++)
        if (dims[i].value <= 0 || dims[i].value > dims[i].max)
            return fail("bad header: %s = %d (must be 1..%d)", dims[i].name, dims[i].value, dims[i].max);
    if (p->n_heads % p->n_kv_heads)
        return fail("bad header: n_heads = %d is not a multiple of n_kv_heads = %d", p->n_heads, p->n_kv_heads);
    if (p->head_dim % 2) return fail("bad header: head_dim = %d is odd (RoPE rotates pairs)", p->head_dim);
    if (!(p->rope_theta > 0) || !isfinite(p->rope_theta)) return fail("bad header: rope_theta = %g", p->rope_theta);
    if (!(p->norm_eps > 0) || !(p->norm_eps < 1)) return fail("bad header: norm_eps = %g", p->norm_eps);
    if (p->shared_classifier != 0 && p->shared_classifier != 1)
        return fail("bad header: shared_classifier = %d (must be 0 or 1)", p->shared_classifier);
    if (p->bos_id < -1 || p->bos_id >= p->vocab_size || p->eos_id < -1 || p->eos_id >= p->vocab_size)
        return fail("bad header: bos %d / eos %d outside the vocab of %d", p->bos_id, p->eos_id, p->vocab_size);
    return 0;
}

// ----------------------------------------------------------------------------
// Tokenizer: the vocabulary and its lookups (sentencepiece-style BPE and byte-level BPE)

enum { TOK_SENTENCEPIECE = 1, TOK_BYTE_BPE = 2 };
enum { PRETOK_NONE = 0, PRETOK_GPT2 = 1, PRETOK_SMOLLM = 2, PRETOK_LLAMA3 = 3 };
enum { FLAG_ADD_DUMMY_PREFIX = 1, FLAG_REMOVE_EXTRA_WHITESPACES = 2, FLAG_BYTE_FALLBACK = 4, FLAG_ADD_BOS = 8,
       FLAG_IGNORE_MERGES = 16 };
#define KNOWN_TOKENIZER_FLAGS 31u // the FLAG_* bits: a file with others is from a newer kvc
enum { PIECE_NORMAL = 1, PIECE_UNKNOWN = 2, PIECE_CONTROL = 3, PIECE_USER_DEFINED = 4, PIECE_UNUSED = 5,
       PIECE_BYTE = 6 };

#define MAX_PIECE_BYTES 1024 // the longest token piece a tokenizer may hold

typedef struct { uint64_t key; int rank, result; } Merge; // byte-level BPE: (left, right) -> merged

typedef struct { size_t start, end; } Span; // bytes start..end-1 of a text

typedef struct {
    int kind, n_tokens, flags, pretokenizer, unk_id, bos_id, eos_id;
    const char **piece;   // stored bytes of each token (not NUL-terminated)
    int *piece_len;
    float *score;
    int *type;
    const char **text;    // what each token decodes to
    int *text_len;
    char *text_buffer;    // backs text
    char *piece_buffer;   // backs piece when read from a tokenizer.bin (else pieces point into the map)
    int byte_token[256];  // the token of each single byte, -1 if none
    int *lookup;          // open-addressing table: piece bytes -> id
    size_t lookup_mask;
    Merge *merges;        // open-addressing table of merge pairs
    size_t merge_mask;
    int *special;         // control and user-defined tokens matched literally in text
    int n_special;
} Tokenizer;

static uint64_t hash_bytes(const char *s, int n) {
    uint64_t h = 1469598103934665603ull; // FNV-1a
    for (int i = 0; i < n; i++) h = (h ^ (uint8_t)s[i]) * 1099511628211ull;
    return h;
}

static uint64_t hash_pair(uint64_t key) {
    key ^= key >> 33;
    key *= 0xff51afd7ed558ccdull;
    return key ^ (key >> 33);
}

static size_t table_size_for(size_t n) {
    size_t size = 16;
    while (size < 2 * n) size <<= 1;
    return size;
}

static int lookup_piece(const Tokenizer *t, const char *s, int n) {
    for (size_t i = hash_bytes(s, n) & t->lookup_mask;; i = (i + 1) & t->lookup_mask) {
        int id = t->lookup[i];
        if (id < 0) return -1;
        if (t->piece_len[id] == n && memcmp(t->piece[id], s, n) == 0) return id;
    }
}

static const Merge *lookup_merge(const Tokenizer *t, int left, int right) {
    uint64_t key = (uint64_t)(uint32_t)left << 32 | (uint32_t)right;
    for (size_t i = hash_pair(key) & t->merge_mask;; i = (i + 1) & t->merge_mask) {
        if (t->merges[i].rank < 0) return NULL;
        if (t->merges[i].key == key) return &t->merges[i];
    }
}

static int parse_byte_piece(const char *s, int n) { // "<0xNN>" -> NN, else -1
    if (n != 6 || memcmp(s, "<0x", 3) || s[5] != '>') return -1;
    int v = 0;
    for (int i = 3; i < 5; i++) {
        char c = s[i];
        int d = c >= '0' && c <= '9' ? c - '0' : c >= 'A' && c <= 'F' ? c - 'A' + 10 : c >= 'a' && c <= 'f' ? c - 'a' + 10 : -1;
        if (d < 0) return -1;
        v = v * 16 + d;
    }
    return v;
}

static const char SPACE_MARK[] = "\xe2\x96\x81"; // U+2581, sentencepiece's escaped space
static const char UNKNOWN_TEXT[] = " \xe2\x81\x87 ";  // " ⁇ "

// Builds what the encoder and decoder need from pieces/scores/types: lookup tables, byte tokens,
// the special-token list and each token's decoded text.
static int tokenizer_index(Tokenizer *t) {
    int n = t->n_tokens;
    t->lookup_mask = table_size_for(n) - 1;
    t->lookup = malloc((t->lookup_mask + 1) * sizeof(int));
    t->special = alloc_zeroed(n, sizeof(int));
    t->text = alloc_zeroed(n, sizeof(char *));
    t->text_len = alloc_zeroed(n, sizeof(int));
    size_t text_bytes = 0;
    for (int i = 0; i < n; i++) text_bytes += t->piece_len[i] + sizeof UNKNOWN_TEXT;
    char *text = alloc_zeroed(text_bytes, 1);
    if (!t->lookup || !t->special || !t->text || !t->text_len || !text) return fail("out of memory for the tokenizer");
    memset(t->lookup, -1, (t->lookup_mask + 1) * sizeof(int));
    for (int b = 0; b < 256; b++) t->byte_token[b] = -1;
    t->text_buffer = text;
    for (int id = 0; id < n; id++) {
        const char *s = t->piece[id];
        int len = t->piece_len[id], type = t->type[id];
        size_t slot = hash_bytes(s, len) & t->lookup_mask;
        while (t->lookup[slot] >= 0 && !(t->piece_len[t->lookup[slot]] == len && !memcmp(t->piece[t->lookup[slot]], s, len)))
            slot = (slot + 1) & t->lookup_mask;
        if (t->lookup[slot] < 0) t->lookup[slot] = id; // a duplicate piece keeps its first id
        t->text[id] = text;
        if (type == PIECE_CONTROL || type == PIECE_UNUSED) {
            // decodes to nothing
        } else if (type == PIECE_UNKNOWN) { // sentencepiece's surface for <unk>
            memcpy(text, UNKNOWN_TEXT, sizeof UNKNOWN_TEXT - 1);
            text += sizeof UNKNOWN_TEXT - 1;
        } else if (type == PIECE_BYTE) {
            int b = parse_byte_piece(s, len);
            if (b < 0) return fail("tokenizer: byte token %d is not of the form <0xNN>", id);
            if (t->byte_token[b] < 0) t->byte_token[b] = id;
            *text++ = (char)b;
        } else if (t->kind == TOK_SENTENCEPIECE) {
            for (int i = 0; i < len; i++) {
                if (i + 3 <= len && !memcmp(s + i, SPACE_MARK, 3)) { *text++ = ' '; i += 2; }
                else *text++ = s[i];
            }
        } else {
            memcpy(text, s, len);
            text += len;
            if (len == 1 && t->byte_token[(uint8_t)s[0]] < 0) t->byte_token[(uint8_t)s[0]] = id;
        }
        t->text_len[id] = (int)(text - t->text[id]);
        if ((type == PIECE_CONTROL || type == PIECE_USER_DEFINED) && len > 0) t->special[t->n_special++] = id;
    }
    return 0;
}

static int tokenizer_index_merges(Tokenizer *t, const uint32_t *pairs, int n_merges) {
    t->merge_mask = table_size_for(n_merges) - 1;
    t->merges = malloc((t->merge_mask + 1) * sizeof(Merge));
    if (!t->merges) return fail("out of memory for %d merges", n_merges);
    for (size_t i = 0; i <= t->merge_mask; i++) t->merges[i].rank = -1;
    char buf[MAX_PIECE_BYTES];
    for (int r = 0; r < n_merges; r++) {
        uint32_t a, b;
        memcpy(&a, pairs + 2 * r, 4);
        memcpy(&b, pairs + 2 * r + 1, 4);
        if (a >= (uint32_t)t->n_tokens || b >= (uint32_t)t->n_tokens)
            return fail("tokenizer: merge %d names a token outside the vocab", r);
        int la = t->piece_len[a], lb = t->piece_len[b];
        if (la + lb > (int)sizeof buf) return fail("tokenizer: merge %d makes a piece longer than %zu bytes", r, sizeof buf);
        memcpy(buf, t->piece[a], la);
        memcpy(buf + la, t->piece[b], lb);
        int result = lookup_piece(t, buf, la + lb);
        if (result < 0) return fail("tokenizer: merge %d makes a piece that is not in the vocab", r);
        uint64_t key = (uint64_t)a << 32 | b;
        size_t slot = hash_pair(key) & t->merge_mask;
        while (t->merges[slot].rank >= 0 && t->merges[slot].key != key) slot = (slot + 1) & t->merge_mask;
        if (t->merges[slot].rank < 0) t->merges[slot] = (Merge){key, r, result}; // keeps the best rank
    }
    return 0;
}

// Room for n tokens' pieces, lengths, scores and types.
static int tokenizer_alloc(Tokenizer *t, int n) {
    t->n_tokens = n;
    t->piece = alloc_zeroed(n, sizeof(char *));
    t->piece_len = alloc_zeroed(n, sizeof(int));
    t->score = alloc_zeroed(n, sizeof(float));
    t->type = alloc_zeroed(n, sizeof(int));
    return t->piece && t->piece_len && t->score && t->type ? 0 : fail("out of memory for the tokenizer");
}

static void tokenizer_free(Tokenizer *t) {
    free(t->piece); free(t->piece_len); free(t->score); free(t->type); free(t->text); free(t->text_len);
    free(t->text_buffer); free(t->piece_buffer); free(t->lookup); free(t->merges); free(t->special);
    memset(t, 0, sizeof *t);
}

// ----------------------------------------------------------------------------
// Tokenizer: pre-tokenizers split text into pieces before BPE, exactly as HF `tokenizers` does.
// The regexes are hand-compiled into one small matcher per pattern that reproduces
// Oniguruma's leftmost-first, backtracking result for that pattern. Pieces are byte
// ranges of the input (no copies, no allocation); byte-level BPE works on raw bytes.

typedef void (*pretok_emit_fn)(void *ctx, const char *piece, size_t len);

// Decodes the code point at s[0..n), n >= 1, and returns its byte length (1..4).
// Invalid, truncated, overlong or surrogate sequences count as one byte of U+FFFD
// (a symbol, so "other"): HF works on Rust strings and never sees invalid UTF-8.
static int utf8_decode(const unsigned char *s, size_t n, uint32_t *cp) {
    unsigned char c = s[0];
    int len; uint32_t v, min;
    if (c < 0x80) { *cp = c; return 1; }
    else if ((c & 0xE0) == 0xC0) { len = 2; v = c & 0x1F; min = 0x80; }
    else if ((c & 0xF0) == 0xE0) { len = 3; v = c & 0x0F; min = 0x800; }
    else if ((c & 0xF8) == 0xF0) { len = 4; v = c & 0x07; min = 0x10000; }
    else { *cp = 0xFFFD; return 1; }
    if ((size_t)len > n) { *cp = 0xFFFD; return 1; }
    for (int i = 1; i < len; i++) {
        if ((s[i] & 0xC0) != 0x80) { *cp = 0xFFFD; return 1; }
        v = (v << 6) | (s[i] & 0x3F);
    }
    if (v < min || v > 0x10FFFF || (v >= 0xD800 && v <= 0xDFFF)) { *cp = 0xFFFD; return 1; }
    *cp = v;
    return len;
}

// Unicode classes. The tables are probed from tokenizers itself (see tools/gen_unicode_tables.py):
// its Oniguruma is Unicode 16 and Rust's char::is_numeric (Digits) is Unicode 17, both
// newer than e.g. Python 3.11's Unicode 14 (which misses ~9k letters such as U+1C89).
// A tokenizers built on another Unicode version may differ on code points new in it.
// BEGIN GENERATED TABLES
// generated by tools/gen_unicode_tables.py from tokenizers' own regex engine; sorted lo,hi pairs
// \p{L} as Oniguruma (Unicode 16) in tokenizers sees it (677 ranges, 141028 code points)
static const uint32_t letter_ranges[] = {
    0x41,0x5A, 0x61,0x7A, 0xAA,0xAA, 0xB5,0xB5, 0xBA,0xBA, 0xC0,0xD6,
    0xD8,0xF6, 0xF8,0x2C1, 0x2C6,0x2D1, 0x2E0,0x2E4, 0x2EC,0x2EC, 0x2EE,0x2EE,
    0x370,0x374, 0x376,0x377, 0x37A,0x37D, 0x37F,0x37F, 0x386,0x386, 0x388,0x38A,
    0x38C,0x38C, 0x38E,0x3A1, 0x3A3,0x3F5, 0x3F7,0x481, 0x48A,0x52F, 0x531,0x556,
    0x559,0x559, 0x560,0x588, 0x5D0,0x5EA, 0x5EF,0x5F2, 0x620,0x64A, 0x66E,0x66F,
    0x671,0x6D3, 0x6D5,0x6D5, 0x6E5,0x6E6, 0x6EE,0x6EF, 0x6FA,0x6FC, 0x6FF,0x6FF,
    0x710,0x710, 0x712,0x72F, 0x74D,0x7A5, 0x7B1,0x7B1, 0x7CA,0x7EA, 0x7F4,0x7F5,
    0x7FA,0x7FA, 0x800,0x815, 0x81A,0x81A, 0x824,0x824, 0x828,0x828, 0x840,0x858,
    0x860,0x86A, 0x870,0x887, 0x889,0x88E, 0x8A0,0x8C9, 0x904,0x939, 0x93D,0x93D,
    0x950,0x950, 0x958,0x961, 0x971,0x980, 0x985,0x98C, 0x98F,0x990, 0x993,0x9A8,
    0x9AA,0x9B0, 0x9B2,0x9B2, 0x9B6,0x9B9, 0x9BD,0x9BD, 0x9CE,0x9CE, 0x9DC,0x9DD,
    0x9DF,0x9E1, 0x9F0,0x9F1, 0x9FC,0x9FC, 0xA05,0xA0A, 0xA0F,0xA10, 0xA13,0xA28,
    0xA2A,0xA30, 0xA32,0xA33, 0xA35,0xA36, 0xA38,0xA39, 0xA59,0xA5C, 0xA5E,0xA5E,
    0xA72,0xA74, 0xA85,0xA8D, 0xA8F,0xA91, 0xA93,0xAA8, 0xAAA,0xAB0, 0xAB2,0xAB3,
    0xAB5,0xAB9, 0xABD,0xABD, 0xAD0,0xAD0, 0xAE0,0xAE1, 0xAF9,0xAF9, 0xB05,0xB0C,
    0xB0F,0xB10, 0xB13,0xB28, 0xB2A,0xB30, 0xB32,0xB33, 0xB35,0xB39, 0xB3D,0xB3D,
    0xB5C,0xB5D, 0xB5F,0xB61, 0xB71,0xB71, 0xB83,0xB83, 0xB85,0xB8A, 0xB8E,0xB90,
    0xB92,0xB95, 0xB99,0xB9A, 0xB9C,0xB9C, 0xB9E,0xB9F, 0xBA3,0xBA4, 0xBA8,0xBAA,
    0xBAE,0xBB9, 0xBD0,0xBD0, 0xC05,0xC0C, 0xC0E,0xC10, 0xC12,0xC28, 0xC2A,0xC39,
    0xC3D,0xC3D, 0xC58,0xC5A, 0xC5D,0xC5D, 0xC60,0xC61, 0xC80,0xC80, 0xC85,0xC8C,
    0xC8E,0xC90, 0xC92,0xCA8, 0xCAA,0xCB3, 0xCB5,0xCB9, 0xCBD,0xCBD, 0xCDD,0xCDE,
    0xCE0,0xCE1, 0xCF1,0xCF2, 0xD04,0xD0C, 0xD0E,0xD10, 0xD12,0xD3A, 0xD3D,0xD3D,
    0xD4E,0xD4E, 0xD54,0xD56, 0xD5F,0xD61, 0xD7A,0xD7F, 0xD85,0xD96, 0xD9A,0xDB1,
    0xDB3,0xDBB, 0xDBD,0xDBD, 0xDC0,0xDC6, 0xE01,0xE30, 0xE32,0xE33, 0xE40,0xE46,
    0xE81,0xE82, 0xE84,0xE84, 0xE86,0xE8A, 0xE8C,0xEA3, 0xEA5,0xEA5, 0xEA7,0xEB0,
    0xEB2,0xEB3, 0xEBD,0xEBD, 0xEC0,0xEC4, 0xEC6,0xEC6, 0xEDC,0xEDF, 0xF00,0xF00,
    0xF40,0xF47, 0xF49,0xF6C, 0xF88,0xF8C, 0x1000,0x102A, 0x103F,0x103F, 0x1050,0x1055,
    0x105A,0x105D, 0x1061,0x1061, 0x1065,0x1066, 0x106E,0x1070, 0x1075,0x1081, 0x108E,0x108E,
    0x10A0,0x10C5, 0x10C7,0x10C7, 0x10CD,0x10CD, 0x10D0,0x10FA, 0x10FC,0x1248, 0x124A,0x124D,
    0x1250,0x1256, 0x1258,0x1258, 0x125A,0x125D, 0x1260,0x1288, 0x128A,0x128D, 0x1290,0x12B0,
    0x12B2,0x12B5, 0x12B8,0x12BE, 0x12C0,0x12C0, 0x12C2,0x12C5, 0x12C8,0x12D6, 0x12D8,0x1310,
    0x1312,0x1315, 0x1318,0x135A, 0x1380,0x138F, 0x13A0,0x13F5, 0x13F8,0x13FD, 0x1401,0x166C,
    0x166F,0x167F, 0x1681,0x169A, 0x16A0,0x16EA, 0x16F1,0x16F8, 0x1700,0x1711, 0x171F,0x1731,
    0x1740,0x1751, 0x1760,0x176C, 0x176E,0x1770, 0x1780,0x17B3, 0x17D7,0x17D7, 0x17DC,0x17DC,
    0x1820,0x1878, 0x1880,0x1884, 0x1887,0x18A8, 0x18AA,0x18AA, 0x18B0,0x18F5, 0x1900,0x191E,
    0x1950,0x196D, 0x1970,0x1974, 0x1980,0x19AB, 0x19B0,0x19C9, 0x1A00,0x1A16, 0x1A20,0x1A54,
    0x1AA7,0x1AA7, 0x1B05,0x1B33, 0x1B45,0x1B4C, 0x1B83,0x1BA0, 0x1BAE,0x1BAF, 0x1BBA,0x1BE5,
    0x1C00,0x1C23, 0x1C4D,0x1C4F, 0x1C5A,0x1C7D, 0x1C80,0x1C8A, 0x1C90,0x1CBA, 0x1CBD,0x1CBF,
    0x1CE9,0x1CEC, 0x1CEE,0x1CF3, 0x1CF5,0x1CF6, 0x1CFA,0x1CFA, 0x1D00,0x1DBF, 0x1E00,0x1F15,
    0x1F18,0x1F1D, 0x1F20,0x1F45, 0x1F48,0x1F4D, 0x1F50,0x1F57, 0x1F59,0x1F59, 0x1F5B,0x1F5B,
    0x1F5D,0x1F5D, 0x1F5F,0x1F7D, 0x1F80,0x1FB4, 0x1FB6,0x1FBC, 0x1FBE,0x1FBE, 0x1FC2,0x1FC4,
    0x1FC6,0x1FCC, 0x1FD0,0x1FD3, 0x1FD6,0x1FDB, 0x1FE0,0x1FEC, 0x1FF2,0x1FF4, 0x1FF6,0x1FFC,
    0x2071,0x2071, 0x207F,0x207F, 0x2090,0x209C, 0x2102,0x2102, 0x2107,0x2107, 0x210A,0x2113,
    0x2115,0x2115, 0x2119,0x211D, 0x2124,0x2124, 0x2126,0x2126, 0x2128,0x2128, 0x212A,0x212D,
    0x212F,0x2139, 0x213C,0x213F, 0x2145,0x2149, 0x214E,0x214E, 0x2183,0x2184, 0x2C00,0x2CE4,
    0x2CEB,0x2CEE, 0x2CF2,0x2CF3, 0x2D00,0x2D25, 0x2D27,0x2D27, 0x2D2D,0x2D2D, 0x2D30,0x2D67,
    0x2D6F,0x2D6F, 0x2D80,0x2D96, 0x2DA0,0x2DA6, 0x2DA8,0x2DAE, 0x2DB0,0x2DB6, 0x2DB8,0x2DBE,
    0x2DC0,0x2DC6, 0x2DC8,0x2DCE, 0x2DD0,0x2DD6, 0x2DD8,0x2DDE, 0x2E2F,0x2E2F, 0x3005,0x3006,
    0x3031,0x3035, 0x303B,0x303C, 0x3041,0x3096, 0x309D,0x309F, 0x30A1,0x30FA, 0x30FC,0x30FF,
    0x3105,0x312F, 0x3131,0x318E, 0x31A0,0x31BF, 0x31F0,0x31FF, 0x3400,0x4DBF, 0x4E00,0xA48C,
    0xA4D0,0xA4FD, 0xA500,0xA60C, 0xA610,0xA61F, 0xA62A,0xA62B, 0xA640,0xA66E, 0xA67F,0xA69D,
    0xA6A0,0xA6E5, 0xA717,0xA71F, 0xA722,0xA788, 0xA78B,0xA7CD, 0xA7D0,0xA7D1, 0xA7D3,0xA7D3,
    0xA7D5,0xA7DC, 0xA7F2,0xA801, 0xA803,0xA805, 0xA807,0xA80A, 0xA80C,0xA822, 0xA840,0xA873,
    0xA882,0xA8B3, 0xA8F2,0xA8F7, 0xA8FB,0xA8FB, 0xA8FD,0xA8FE, 0xA90A,0xA925, 0xA930,0xA946,
    0xA960,0xA97C, 0xA984,0xA9B2, 0xA9CF,0xA9CF, 0xA9E0,0xA9E4, 0xA9E6,0xA9EF, 0xA9FA,0xA9FE,
    0xAA00,0xAA28, 0xAA40,0xAA42, 0xAA44,0xAA4B, 0xAA60,0xAA76, 0xAA7A,0xAA7A, 0xAA7E,0xAAAF,
    0xAAB1,0xAAB1, 0xAAB5,0xAAB6, 0xAAB9,0xAABD, 0xAAC0,0xAAC0, 0xAAC2,0xAAC2, 0xAADB,0xAADD,
    0xAAE0,0xAAEA, 0xAAF2,0xAAF4, 0xAB01,0xAB06, 0xAB09,0xAB0E, 0xAB11,0xAB16, 0xAB20,0xAB26,
    0xAB28,0xAB2E, 0xAB30,0xAB5A, 0xAB5C,0xAB69, 0xAB70,0xABE2, 0xAC00,0xD7A3, 0xD7B0,0xD7C6,
    0xD7CB,0xD7FB, 0xF900,0xFA6D, 0xFA70,0xFAD9, 0xFB00,0xFB06, 0xFB13,0xFB17, 0xFB1D,0xFB1D,
    0xFB1F,0xFB28, 0xFB2A,0xFB36, 0xFB38,0xFB3C, 0xFB3E,0xFB3E, 0xFB40,0xFB41, 0xFB43,0xFB44,
    0xFB46,0xFBB1, 0xFBD3,0xFD3D, 0xFD50,0xFD8F, 0xFD92,0xFDC7, 0xFDF0,0xFDFB, 0xFE70,0xFE74,
    0xFE76,0xFEFC, 0xFF21,0xFF3A, 0xFF41,0xFF5A, 0xFF66,0xFFBE, 0xFFC2,0xFFC7, 0xFFCA,0xFFCF,
    0xFFD2,0xFFD7, 0xFFDA,0xFFDC, 0x10000,0x1000B, 0x1000D,0x10026, 0x10028,0x1003A, 0x1003C,0x1003D,
    0x1003F,0x1004D, 0x10050,0x1005D, 0x10080,0x100FA, 0x10280,0x1029C, 0x102A0,0x102D0, 0x10300,0x1031F,
    0x1032D,0x10340, 0x10342,0x10349, 0x10350,0x10375, 0x10380,0x1039D, 0x103A0,0x103C3, 0x103C8,0x103CF,
    0x10400,0x1049D, 0x104B0,0x104D3, 0x104D8,0x104FB, 0x10500,0x10527, 0x10530,0x10563, 0x10570,0x1057A,
    0x1057C,0x1058A, 0x1058C,0x10592, 0x10594,0x10595, 0x10597,0x105A1, 0x105A3,0x105B1, 0x105B3,0x105B9,
    0x105BB,0x105BC, 0x105C0,0x105F3, 0x10600,0x10736, 0x10740,0x10755, 0x10760,0x10767, 0x10780,0x10785,
    0x10787,0x107B0, 0x107B2,0x107BA, 0x10800,0x10805, 0x10808,0x10808, 0x1080A,0x10835, 0x10837,0x10838,
    0x1083C,0x1083C, 0x1083F,0x10855, 0x10860,0x10876, 0x10880,0x1089E, 0x108E0,0x108F2, 0x108F4,0x108F5,
    0x10900,0x10915, 0x10920,0x10939, 0x10980,0x109B7, 0x109BE,0x109BF, 0x10A00,0x10A00, 0x10A10,0x10A13,
    0x10A15,0x10A17, 0x10A19,0x10A35, 0x10A60,0x10A7C, 0x10A80,0x10A9C, 0x10AC0,0x10AC7, 0x10AC9,0x10AE4,
    0x10B00,0x10B35, 0x10B40,0x10B55, 0x10B60,0x10B72, 0x10B80,0x10B91, 0x10C00,0x10C48, 0x10C80,0x10CB2,
    0x10CC0,0x10CF2, 0x10D00,0x10D23, 0x10D4A,0x10D65, 0x10D6F,0x10D85, 0x10E80,0x10EA9, 0x10EB0,0x10EB1,
    0x10EC2,0x10EC4, 0x10F00,0x10F1C, 0x10F27,0x10F27, 0x10F30,0x10F45, 0x10F70,0x10F81, 0x10FB0,0x10FC4,
    0x10FE0,0x10FF6, 0x11003,0x11037, 0x11071,0x11072, 0x11075,0x11075, 0x11083,0x110AF, 0x110D0,0x110E8,
    0x11103,0x11126, 0x11144,0x11144, 0x11147,0x11147, 0x11150,0x11172, 0x11176,0x11176, 0x11183,0x111B2,
    0x111C1,0x111C4, 0x111DA,0x111DA, 0x111DC,0x111DC, 0x11200,0x11211, 0x11213,0x1122B, 0x1123F,0x11240,
    0x11280,0x11286, 0x11288,0x11288, 0x1128A,0x1128D, 0x1128F,0x1129D, 0x1129F,0x112A8, 0x112B0,0x112DE,
    0x11305,0x1130C, 0x1130F,0x11310, 0x11313,0x11328, 0x1132A,0x11330, 0x11332,0x11333, 0x11335,0x11339,
    0x1133D,0x1133D, 0x11350,0x11350, 0x1135D,0x11361, 0x11380,0x11389, 0x1138B,0x1138B, 0x1138E,0x1138E,
    0x11390,0x113B5, 0x113B7,0x113B7, 0x113D1,0x113D1, 0x113D3,0x113D3, 0x11400,0x11434, 0x11447,0x1144A,
    0x1145F,0x11461, 0x11480,0x114AF, 0x114C4,0x114C5, 0x114C7,0x114C7, 0x11580,0x115AE, 0x115D8,0x115DB,
    0x11600,0x1162F, 0x11644,0x11644, 0x11680,0x116AA, 0x116B8,0x116B8, 0x11700,0x1171A, 0x11740,0x11746,
    0x11800,0x1182B, 0x118A0,0x118DF, 0x118FF,0x11906, 0x11909,0x11909, 0x1190C,0x11913, 0x11915,0x11916,
    0x11918,0x1192F, 0x1193F,0x1193F, 0x11941,0x11941, 0x119A0,0x119A7, 0x119AA,0x119D0, 0x119E1,0x119E1,
    0x119E3,0x119E3, 0x11A00,0x11A00, 0x11A0B,0x11A32, 0x11A3A,0x11A3A, 0x11A50,0x11A50, 0x11A5C,0x11A89,
    0x11A9D,0x11A9D, 0x11AB0,0x11AF8, 0x11BC0,0x11BE0, 0x11C00,0x11C08, 0x11C0A,0x11C2E, 0x11C40,0x11C40,
    0x11C72,0x11C8F, 0x11D00,0x11D06, 0x11D08,0x11D09, 0x11D0B,0x11D30, 0x11D46,0x11D46, 0x11D60,0x11D65,
    0x11D67,0x11D68, 0x11D6A,0x11D89, 0x11D98,0x11D98, 0x11EE0,0x11EF2, 0x11F02,0x11F02, 0x11F04,0x11F10,
    0x11F12,0x11F33, 0x11FB0,0x11FB0, 0x12000,0x12399, 0x12480,0x12543, 0x12F90,0x12FF0, 0x13000,0x1342F,
    0x13441,0x13446, 0x13460,0x143FA, 0x14400,0x14646, 0x16100,0x1611D, 0x16800,0x16A38, 0x16A40,0x16A5E,
    0x16A70,0x16ABE, 0x16AD0,0x16AED, 0x16B00,0x16B2F, 0x16B40,0x16B43, 0x16B63,0x16B77, 0x16B7D,0x16B8F,
    0x16D40,0x16D6C, 0x16E40,0x16E7F, 0x16F00,0x16F4A, 0x16F50,0x16F50, 0x16F93,0x16F9F, 0x16FE0,0x16FE1,
    0x16FE3,0x16FE3, 0x17000,0x187F7, 0x18800,0x18CD5, 0x18CFF,0x18D08, 0x1AFF0,0x1AFF3, 0x1AFF5,0x1AFFB,
    0x1AFFD,0x1AFFE, 0x1B000,0x1B122, 0x1B132,0x1B132, 0x1B150,0x1B152, 0x1B155,0x1B155, 0x1B164,0x1B167,
    0x1B170,0x1B2FB, 0x1BC00,0x1BC6A, 0x1BC70,0x1BC7C, 0x1BC80,0x1BC88, 0x1BC90,0x1BC99, 0x1D400,0x1D454,
    0x1D456,0x1D49C, 0x1D49E,0x1D49F, 0x1D4A2,0x1D4A2, 0x1D4A5,0x1D4A6, 0x1D4A9,0x1D4AC, 0x1D4AE,0x1D4B9,
    0x1D4BB,0x1D4BB, 0x1D4BD,0x1D4C3, 0x1D4C5,0x1D505, 0x1D507,0x1D50A, 0x1D50D,0x1D514, 0x1D516,0x1D51C,
    0x1D51E,0x1D539, 0x1D53B,0x1D53E, 0x1D540,0x1D544, 0x1D546,0x1D546, 0x1D54A,0x1D550, 0x1D552,0x1D6A5,
    0x1D6A8,0x1D6C0, 0x1D6C2,0x1D6DA, 0x1D6DC,0x1D6FA, 0x1D6FC,0x1D714, 0x1D716,0x1D734, 0x1D736,0x1D74E,
    0x1D750,0x1D76E, 0x1D770,0x1D788, 0x1D78A,0x1D7A8, 0x1D7AA,0x1D7C2, 0x1D7C4,0x1D7CB, 0x1DF00,0x1DF1E,
    0x1DF25,0x1DF2A, 0x1E030,0x1E06D, 0x1E100,0x1E12C, 0x1E137,0x1E13D, 0x1E14E,0x1E14E, 0x1E290,0x1E2AD,
    0x1E2C0,0x1E2EB, 0x1E4D0,0x1E4EB, 0x1E5D0,0x1E5ED, 0x1E5F0,0x1E5F0, 0x1E7E0,0x1E7E6, 0x1E7E8,0x1E7EB,
    0x1E7ED,0x1E7EE, 0x1E7F0,0x1E7FE, 0x1E800,0x1E8C4, 0x1E900,0x1E943, 0x1E94B,0x1E94B, 0x1EE00,0x1EE03,
    0x1EE05,0x1EE1F, 0x1EE21,0x1EE22, 0x1EE24,0x1EE24, 0x1EE27,0x1EE27, 0x1EE29,0x1EE32, 0x1EE34,0x1EE37,
    0x1EE39,0x1EE39, 0x1EE3B,0x1EE3B, 0x1EE42,0x1EE42, 0x1EE47,0x1EE47, 0x1EE49,0x1EE49, 0x1EE4B,0x1EE4B,
    0x1EE4D,0x1EE4F, 0x1EE51,0x1EE52, 0x1EE54,0x1EE54, 0x1EE57,0x1EE57, 0x1EE59,0x1EE59, 0x1EE5B,0x1EE5B,
    0x1EE5D,0x1EE5D, 0x1EE5F,0x1EE5F, 0x1EE61,0x1EE62, 0x1EE64,0x1EE64, 0x1EE67,0x1EE6A, 0x1EE6C,0x1EE72,
    0x1EE74,0x1EE77, 0x1EE79,0x1EE7C, 0x1EE7E,0x1EE7E, 0x1EE80,0x1EE89, 0x1EE8B,0x1EE9B, 0x1EEA1,0x1EEA3,
    0x1EEA5,0x1EEA9, 0x1EEAB,0x1EEBB, 0x20000,0x2A6DF, 0x2A700,0x2B739, 0x2B740,0x2B81D, 0x2B820,0x2CEA1,
    0x2CEB0,0x2EBE0, 0x2EBF0,0x2EE5D, 0x2F800,0x2FA1D, 0x30000,0x3134A, 0x31350,0x323AF,
};
// \p{N} as Oniguruma (Unicode 16) in tokenizers sees it (144 ranges, 1911 code points)
static const uint32_t number_ranges[] = {
    0x30,0x39, 0xB2,0xB3, 0xB9,0xB9, 0xBC,0xBE, 0x660,0x669, 0x6F0,0x6F9,
    0x7C0,0x7C9, 0x966,0x96F, 0x9E6,0x9EF, 0x9F4,0x9F9, 0xA66,0xA6F, 0xAE6,0xAEF,
    0xB66,0xB6F, 0xB72,0xB77, 0xBE6,0xBF2, 0xC66,0xC6F, 0xC78,0xC7E, 0xCE6,0xCEF,
    0xD58,0xD5E, 0xD66,0xD78, 0xDE6,0xDEF, 0xE50,0xE59, 0xED0,0xED9, 0xF20,0xF33,
    0x1040,0x1049, 0x1090,0x1099, 0x1369,0x137C, 0x16EE,0x16F0, 0x17E0,0x17E9, 0x17F0,0x17F9,
    0x1810,0x1819, 0x1946,0x194F, 0x19D0,0x19DA, 0x1A80,0x1A89, 0x1A90,0x1A99, 0x1B50,0x1B59,
    0x1BB0,0x1BB9, 0x1C40,0x1C49, 0x1C50,0x1C59, 0x2070,0x2070, 0x2074,0x2079, 0x2080,0x2089,
    0x2150,0x2182, 0x2185,0x2189, 0x2460,0x249B, 0x24EA,0x24FF, 0x2776,0x2793, 0x2CFD,0x2CFD,
    0x3007,0x3007, 0x3021,0x3029, 0x3038,0x303A, 0x3192,0x3195, 0x3220,0x3229, 0x3248,0x324F,
    0x3251,0x325F, 0x3280,0x3289, 0x32B1,0x32BF, 0xA620,0xA629, 0xA6E6,0xA6EF, 0xA830,0xA835,
    0xA8D0,0xA8D9, 0xA900,0xA909, 0xA9D0,0xA9D9, 0xA9F0,0xA9F9, 0xAA50,0xAA59, 0xABF0,0xABF9,
    0xFF10,0xFF19, 0x10107,0x10133, 0x10140,0x10178, 0x1018A,0x1018B, 0x102E1,0x102FB, 0x10320,0x10323,
    0x10341,0x10341, 0x1034A,0x1034A, 0x103D1,0x103D5, 0x104A0,0x104A9, 0x10858,0x1085F, 0x10879,0x1087F,
    0x108A7,0x108AF, 0x108FB,0x108FF, 0x10916,0x1091B, 0x109BC,0x109BD, 0x109C0,0x109CF, 0x109D2,0x109FF,
    0x10A40,0x10A48, 0x10A7D,0x10A7E, 0x10A9D,0x10A9F, 0x10AEB,0x10AEF, 0x10B58,0x10B5F, 0x10B78,0x10B7F,
    0x10BA9,0x10BAF, 0x10CFA,0x10CFF, 0x10D30,0x10D39, 0x10D40,0x10D49, 0x10E60,0x10E7E, 0x10F1D,0x10F26,
    0x10F51,0x10F54, 0x10FC5,0x10FCB, 0x11052,0x1106F, 0x110F0,0x110F9, 0x11136,0x1113F, 0x111D0,0x111D9,
    0x111E1,0x111F4, 0x112F0,0x112F9, 0x11450,0x11459, 0x114D0,0x114D9, 0x11650,0x11659, 0x116C0,0x116C9,
    0x116D0,0x116E3, 0x11730,0x1173B, 0x118E0,0x118F2, 0x11950,0x11959, 0x11BF0,0x11BF9, 0x11C50,0x11C6C,
    0x11D50,0x11D59, 0x11DA0,0x11DA9, 0x11F50,0x11F59, 0x11FC0,0x11FD4, 0x12400,0x1246E, 0x16130,0x16139,
    0x16A60,0x16A69, 0x16AC0,0x16AC9, 0x16B50,0x16B59, 0x16B5B,0x16B61, 0x16D70,0x16D79, 0x16E80,0x16E96,
    0x1CCF0,0x1CCF9, 0x1D2C0,0x1D2D3, 0x1D2E0,0x1D2F3, 0x1D360,0x1D378, 0x1D7CE,0x1D7FF, 0x1E140,0x1E149,
    0x1E2F0,0x1E2F9, 0x1E4F0,0x1E4F9, 0x1E5F1,0x1E5FA, 0x1E8C7,0x1E8CF, 0x1E950,0x1E959, 0x1EC71,0x1ECAB,
    0x1ECAD,0x1ECAF, 0x1ECB1,0x1ECB4, 0x1ED01,0x1ED2D, 0x1ED2F,0x1ED3D, 0x1F100,0x1F10C, 0x1FBF0,0x1FBF9,
};
// \s in Oniguruma = Unicode White_Space (10 ranges, 25 code points)
static const uint32_t space_ranges[] = {
    0x9,0xD, 0x20,0x20, 0x85,0x85, 0xA0,0xA0, 0x1680,0x1680, 0x2000,0x200A,
    0x2028,0x2029, 0x202F,0x202F, 0x205F,0x205F, 0x3000,0x3000,
};
// Rust char::is_numeric (Unicode 17, used by Digits) minus the \p{N} above (2 ranges, 13 code points)
static const uint32_t numeric_extra_ranges[] = {
    0x11DE0,0x11DE9, 0x16FF4,0x16FF6,
};
// END GENERATED TABLES

// binary search over sorted, disjoint lo,hi pairs
static int in_ranges(const uint32_t *r, size_t npairs, uint32_t cp) {
    size_t lo = 0, hi = npairs;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        if (cp < r[2 * mid]) hi = mid;
        else if (cp > r[2 * mid + 1]) lo = mid + 1;
        else return 1;
    }
    return 0;
}
#define RANGES(t) (t), sizeof(t) / sizeof((t)[0]) / 2

static int is_letter(uint32_t cp) { // \p{L}; note combining marks (\p{M}) are not letters
    if (cp < 0x80) return (cp | 0x20) >= 'a' && (cp | 0x20) <= 'z';
    return in_ranges(RANGES(letter_ranges), cp);
}
static int is_number(uint32_t cp) { // \p{N}
    if (cp < 0x80) return cp >= '0' && cp <= '9';
    return in_ranges(RANGES(number_ranges), cp);
}
static int is_space(uint32_t cp) { // \s
    if (cp < 0x80) return cp == ' ' || (cp >= '\t' && cp <= '\r');
    return in_ranges(RANGES(space_ranges), cp);
}
static int is_numeric(uint32_t cp) { // Rust char::is_numeric, what the Digits pre-tokenizer splits on
    return is_number(cp) || in_ranges(RANGES(numeric_extra_ranges), cp);
}

enum { CH_OTHER, CH_LETTER, CH_NUMBER, CH_SPACE, CH_END };

// class of the char at s[i] (CH_END at the end of input); *next = offset just past it
static int char_at(const unsigned char *s, size_t n, size_t i, size_t *next) {
    uint32_t cp;
    if (i >= n) { *next = n; return CH_END; }
    *next = i + utf8_decode(s + i, n - i, &cp);
    return is_letter(cp) ? CH_LETTER : is_number(cp) ? CH_NUMBER : is_space(cp) ? CH_SPACE : CH_OTHER;
}

// end of the run of chars of class cls starting at i
static size_t skip_class(const unsigned char *s, size_t n, size_t i, int cls) {
    size_t j;
    while (char_at(s, n, i, &j) == cls) i = j;
    return i;
}

static int is_crlf(unsigned char c) { return c == '\r' || c == '\n'; }

// Matches a whitespace run at i (s[i] must be whitespace) as '\s+(?!\S)|\s+' does:
// a run followed by a non-space gives its last char back, so " world" stays one piece,
// unless the run is a single char. With llama3 set, '\s*[\r\n]+' is tried first: the run
// up to and including its last \r or \n.
static size_t match_space_run(const unsigned char *s, size_t n, size_t i, int llama3) {
    size_t e = i, last = i, nl = 0, j;
    while (char_at(s, n, e, &j) == CH_SPACE) {
        if (is_crlf(s[e])) nl = j;
        last = e;
        e = j;
    }
    if (llama3 && nl) return nl;
    return (e < n && last > i) ? last : e;
}

// 's 't 're 've 'm 'll 'd at i; returns match length or 0. Llama 3 matches them
// case-insensitively, and under Oniguruma's (?i) U+017F (long s, C5 BF) folds to 's'.
static size_t match_contraction(const unsigned char *s, size_t n, size_t i, int icase) {
    static const char *const suffixes[] = { "s", "t", "re", "ve", "m", "ll", "d" };
    if (s[i] != '\'') return 0;
    for (int k = 0; k < 7; k++) {
        const char *p = suffixes[k];
        size_t j = i + 1;
        for (; *p && j < n; p++) {
            if (s[j] == *p || (icase && (s[j] | 0x20) == *p)) j += 1;
            else if (icase && *p == 's' && s[j] == 0xC5 && j + 1 < n && s[j + 1] == 0xBF) j += 2;
            else break;
        }
        if (!*p) return j - i;
    }
    return 0;
}

// GPT-2: 's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
static size_t match_gpt2(const unsigned char *s, size_t n, size_t i) {
    size_t j, j2, k = match_contraction(s, n, i, 0);
    if (k) return i + k;
    int c = char_at(s, n, i, &j), c2 = char_at(s, n, j, &j2);
    if (s[i] == ' ' && c2 != CH_SPACE && c2 != CH_END) return skip_class(s, n, j2, c2); // ' ?X+'
    if (c != CH_SPACE) return skip_class(s, n, j, c);                                    // 'X+'
    return match_space_run(s, n, i, 0);
}

// Llama 3: (?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|
//          ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+
static size_t match_llama3(const unsigned char *s, size_t n, size_t i) {
    size_t j, j2, k = match_contraction(s, n, i, 1);
    if (k) return i + k;
    int c = char_at(s, n, i, &j), c2 = char_at(s, n, j, &j2);
    if (c == CH_LETTER) return skip_class(s, n, j, CH_LETTER);
    if (c != CH_NUMBER && !is_crlf(s[i]) && c2 == CH_LETTER) return skip_class(s, n, j2, CH_LETTER);
    if (c == CH_NUMBER) { // \p{N}{1,3}
        for (int m = 1; m < 3 && char_at(s, n, j, &j2) == CH_NUMBER; m++) j = j2;
        return j;
    }
    if (s[i] == ' ' && c2 == CH_OTHER) c = CH_OTHER, j = j2; // the optional leading space
    if (c == CH_OTHER) {
        j = skip_class(s, n, j, CH_OTHER);
        while (j < n && is_crlf(s[j])) j++;
        return j;
    }
    return match_space_run(s, n, i, 1);
}

// Splits text[0..n) with a matcher; every matcher consumes at least one char, and the
// patterns cover every char, so there are no gaps between matches.
static void split_matches(size_t (*match)(const unsigned char *, size_t, size_t),
                          const char *text, size_t n, pretok_emit_fn emit, void *ctx) {
    const unsigned char *s = (const unsigned char *)text;
    for (size_t i = 0, e; i < n; i = e) {
        e = match(s, n, i);
        emit(ctx, text + i, e - i);
    }
}

// SmolLM2: Digits(individual_digits) isolates every numeric char, then the GPT-2 regex runs
// inside each remaining piece (so its (?!\S) lookahead stops at a digit boundary).
static void split_smollm(const char *text, size_t n, pretok_emit_fn emit, void *ctx) {
    const unsigned char *s = (const unsigned char *)text;
    size_t start = 0, j;
    for (size_t i = 0; i < n; i = j) {
        uint32_t cp;
        j = i + utf8_decode(s + i, n - i, &cp);
        if (!is_numeric(cp)) continue;
        split_matches(match_gpt2, text + start, i - start, emit, ctx);
        emit(ctx, text + i, j - i);
        start = j;
    }
    split_matches(match_gpt2, text + start, n - start, emit, ctx);
}

// Splits text[0..n) into pieces the way the named pre-tokenizer does, calling emit for each in order.
static void pretokenize(int kind, const char *text, size_t n, pretok_emit_fn emit, void *ctx) {
    switch (kind) {
    case PRETOK_GPT2: split_matches(match_gpt2, text, n, emit, ctx); break;
    case PRETOK_SMOLLM: split_smollm(text, n, emit, ctx); break;
    case PRETOK_LLAMA3: split_matches(match_llama3, text, n, emit, ctx); break;
    default: if (n > 0) emit(ctx, text, n); break;
    }
}

// ----------------------------------------------------------------------------
// Tokenizer: BPE merging, shared by both kinds

typedef struct { int start, len, id, prev, next; } Symbol; // a run of input that is one token so far

typedef struct {
    float priority;          // higher merges first: a piece's score, or minus a merge's rank
    int left, right;         // adjacent symbols
    int left_id, right_id;   // their tokens when queued: a later change makes the candidate stale
    int result;
} MergeCandidate;

static int merge_first(const MergeCandidate *a, const MergeCandidate *b) {
    return a->priority != b->priority ? a->priority > b->priority : a->left < b->left; // ties: leftmost
}

static void heap_push(MergeCandidate *heap, int *n, MergeCandidate c) {
    int i = (*n)++;
    while (i > 0 && merge_first(&c, &heap[(i - 1) / 2])) {
        heap[i] = heap[(i - 1) / 2];
        i = (i - 1) / 2;
    }
    heap[i] = c;
}

static MergeCandidate heap_pop(MergeCandidate *heap, int *n) {
    MergeCandidate top = heap[0], last = heap[--*n];
    int i = 0;
    for (;;) {
        int child = 2 * i + 1;
        if (child >= *n) break;
        if (child + 1 < *n && merge_first(&heap[child + 1], &heap[child])) child++;
        if (!merge_first(&heap[child], &last)) break;
        heap[i] = heap[child];
        i = child;
    }
    heap[i] = last;
    return top;
}

static int mergeable(const Tokenizer *t, int id) {
    return id >= 0 && (t->type[id] == PIECE_NORMAL || t->type[id] == PIECE_USER_DEFINED);
}

// Queues the merge of symbols a and b if the vocab has one.
static void queue_merge(const Tokenizer *t, const char *text, const Symbol *sym, int a, int b,
                        MergeCandidate *heap, int *n) {
    if (sym[a].id < 0 || sym[b].id < 0) return;
    MergeCandidate c = {0, a, b, sym[a].id, sym[b].id, -1};
    if (t->kind == TOK_BYTE_BPE) {
        const Merge *m = lookup_merge(t, sym[a].id, sym[b].id);
        if (!m) return;
        c.priority = -(float)m->rank;
        c.result = m->result;
    } else {
        c.result = lookup_piece(t, text + sym[a].start, sym[a].len + sym[b].len);
        if (!mergeable(t, c.result)) return;
        c.priority = t->score[c.result];
    }
    heap_push(heap, n, c);
}

// Merges the linked symbols 0..n-1 greedily, best pair first, as sentencepiece and HF BPE do.
// heap holds at least 3n candidates (n-1 to start, two more per merge).
static void bpe_merge(const Tokenizer *t, const char *text, Symbol *sym, int n, MergeCandidate *heap) {
    int queued = 0;
    for (int i = 0; i + 1 < n; i++) queue_merge(t, text, sym, i, i + 1, heap, &queued);
    while (queued > 0) {
        MergeCandidate c = heap_pop(heap, &queued);
        Symbol *a = &sym[c.left], *b = &sym[c.right];
        if (a->len == 0 || b->len == 0 || a->next != c.right || a->id != c.left_id || b->id != c.right_id)
            continue; // stale: one side merged since
        a->id = c.result;
        a->len += b->len;
        a->next = b->next;
        if (b->next >= 0) sym[b->next].prev = c.left;
        b->len = 0;
        if (a->prev >= 0) queue_merge(t, text, sym, a->prev, c.left, heap, &queued);
        if (a->next >= 0) queue_merge(t, text, sym, c.left, a->next, heap, &queued);
    }
}

// The longest special token spelled at s whose type is in type_mask (bits 1 << PIECE_*), or -1.
static int match_special(const Tokenizer *t, const char *s, size_t n, int type_mask, int *len) {
    int best = -1;
    *len = 0;
    for (int i = 0; i < t->n_special; i++) {
        int id = t->special[i], l = t->piece_len[id];
        if ((type_mask >> t->type[id] & 1) && l > *len && (size_t)l <= n && !memcmp(s, t->piece[id], l)) {
            best = id;
            *len = l;
        }
    }
    return best;
}

// ----------------------------------------------------------------------------
// Tokenizer: sentencepiece-style encoding

// Applies the model's normalizer settings: optional whitespace cleanup, the dummy prefix, and
// spaces escaped as U+2581, the form pieces are stored in. out holds 3 * len + 3 bytes.
// Like sentencepiece, the cleanup drops leading spaces and repeats of a space from the input, and
// every trailing U+2581 from the output, including ones the input spelled literally.
static size_t sp_normalize(const Tokenizer *t, const char *text, size_t len, char *out) {
    int remove_extra = t->flags & FLAG_REMOVE_EXTRA_WHITESPACES;
    size_t begin = 0, o = 0;
    while (remove_extra && begin < len && text[begin] == ' ') begin++;
    if (begin == len) return 0;
    if (t->flags & FLAG_ADD_DUMMY_PREFIX) {
        memcpy(out, SPACE_MARK, 3);
        o = 3;
    }
    for (size_t i = begin; i < len; i++) {
        if (text[i] != ' ') out[o++] = text[i];
        else if (!(remove_extra && text[i - 1] == ' ')) {
            memcpy(out + o, SPACE_MARK, 3);
            o += 3;
        }
    }
    while (remove_extra && o >= 3 && !memcmp(out + o - 3, SPACE_MARK, 3)) o -= 3;
    return o;
}

static int encode_sentencepiece(const Tokenizer *t, const char *text, size_t len, int *out) {
    char *norm = malloc(3 * len + 4);
    Symbol *sym = malloc((3 * len + 4) * sizeof(Symbol));
    MergeCandidate *heap = malloc(3 * (3 * len + 4) * sizeof(MergeCandidate));
    if (!norm || !sym || !heap) {
        free(norm); free(sym); free(heap);
        return fail("out of memory encoding %zu bytes", len);
    }
    size_t n = sp_normalize(t, text, len, norm);
    int ns = 0;
    for (size_t i = 0; i < n; ns++) { // one symbol per character (user-defined pieces stay whole)
        int special_len, id = match_special(t, norm + i, n - i, 1 << PIECE_USER_DEFINED, &special_len);
        uint32_t cp;
        int clen = id >= 0 ? special_len : utf8_decode((const unsigned char *)norm + i, n - i, &cp);
        if (id < 0) id = lookup_piece(t, norm + i, clen);
        sym[ns] = (Symbol){(int)i, clen, mergeable(t, id) ? id : -1, ns - 1, ns + 1};
        i += clen;
    }
    if (ns > 0) sym[ns - 1].next = -1;
    bpe_merge(t, norm, sym, ns, heap);
    int count = 0;
    for (int i = 0; ns > 0 && i >= 0; i = sym[i].next) {
        if (sym[i].id >= 0) out[count++] = sym[i].id;
        else if (t->flags & FLAG_BYTE_FALLBACK) { // a character the vocab lacks: spell its bytes
            for (int b = 0; b < sym[i].len; b++) {
                int byte_id = t->byte_token[(uint8_t)norm[sym[i].start + b]];
                if (byte_id >= 0) out[count++] = byte_id;
                else if (t->unk_id >= 0) out[count++] = t->unk_id;
            }
        } else if (t->unk_id >= 0) out[count++] = t->unk_id;
    }
    free(norm); free(sym); free(heap);
    return count;
}

// ----------------------------------------------------------------------------
// Tokenizer: byte-level BPE encoding (GPT-2 style; pieces are stored as raw bytes)

typedef struct {
    const Tokenizer *t;
    Symbol *sym;
    MergeCandidate *heap;
    int *out, count;
} ByteBpeRun;

// BPE over one pre-token: start from its bytes, merge by rank. With ignore_merges (Llama 3), a
// pre-token the vocab holds whole is that token, whatever the merges would make of it.
static void byte_bpe_piece(void *ctx, const char *piece, size_t len) {
    ByteBpeRun *r = ctx;
    int n = (int)len, whole = r->t->flags & FLAG_IGNORE_MERGES ? lookup_piece(r->t, piece, n) : -1;
    if (mergeable(r->t, whole)) {
        r->out[r->count++] = whole;
        return;
    }
    for (int i = 0; i < n; i++)
        r->sym[i] = (Symbol){i, 1, r->t->byte_token[(uint8_t)piece[i]], i - 1, i + 1 < n ? i + 1 : -1};
    bpe_merge(r->t, piece, r->sym, n, r->heap);
    for (int i = 0; n > 0 && i >= 0; i = r->sym[i].next)
        if (r->sym[i].id >= 0) r->out[r->count++] = r->sym[i].id;
        else if (r->t->unk_id >= 0) r->out[r->count++] = r->t->unk_id;
}

static int encode_byte_bpe(const Tokenizer *t, const char *text, size_t len, int *out) {
    ByteBpeRun r = {t, malloc((len + 1) * sizeof(Symbol)), malloc(3 * (len + 1) * sizeof(MergeCandidate)), out, 0};
    int ok = r.sym && r.heap;
    if (ok) pretokenize(t->pretokenizer, text, len, byte_bpe_piece, &r);
    free(r.sym);
    free(r.heap);
    return ok ? r.count : fail("out of memory encoding %zu bytes", len);
}

static int encode_segment(const Tokenizer *t, const char *text, size_t len, int *out) {
    return t->kind == TOK_SENTENCEPIECE ? encode_sentencepiece(t, text, len, out) : encode_byte_bpe(t, text, len, out);
}

// Room encode() needs for len bytes of text: a byte can become 3 tokens (a space as U+2581 bytes).
static size_t encode_capacity(size_t len) { return 3 * len + 8; }

// Text -> token ids in out (encode_capacity(len) of room), with a leading BOS if asked and the
// tokenizer adds one. With `special`, control tokens spelled in the text (e.g. "<|im_end|>") become
// their ids, as Hugging Face does by default; without it, text is only text. Byte-level BPE's
// user-defined tokens match either way (as in HF and llama.cpp): they are not control tokens.
// `plain` lists n_plain sorted, disjoint byte ranges where no control token may match even with
// `special`: in a chat, the users' text, so that nobody can type a turn's end.
static int encode(const Tokenizer *t, const char *text, size_t len, int add_bos, int special, const Span *plain,
                  int n_plain, int *out) {
    int count = 0;
    if (add_bos && (t->flags & FLAG_ADD_BOS) && t->bos_id >= 0) out[count++] = t->bos_id;
    int text_mask = t->kind == TOK_BYTE_BPE ? 1 << PIECE_USER_DEFINED : 0;
    int control_mask = special ? text_mask | 1 << PIECE_CONTROL : text_mask;
    size_t segment = 0;
    for (size_t i = 0, p = 0; i <= len;) {
        while (p < (size_t)n_plain && plain[p].end <= i) p++;
        int in_plain = p < (size_t)n_plain && plain[p].start <= i;
        size_t stop = in_plain ? plain[p].end : p < (size_t)n_plain ? plain[p].start : len; // matches stay inside
        int mask = in_plain ? text_mask : control_mask;
        int special_len, id = mask && i < len ? match_special(t, text + i, stop - i, mask, &special_len) : -1;
        if (id < 0 && i < len) {
            i++;
            continue;
        }
        if (i > segment) {
            int n = encode_segment(t, text + segment, i - segment, out + count);
            if (n < 0) return -1;
            count += n;
        }
        if (id < 0) break;
        out[count++] = id;
        i += special_len;
        segment = i;
    }
    return count;
}

// What token decodes to after prev (-1 at the start of a text): sentencepiece drops the space its
// dummy prefix added, i.e. the leading U+2581 of the first piece.
static const char *token_text(const Tokenizer *t, int prev, int token, int *len) {
    const char *s = t->text[token];
    *len = t->text_len[token];
    int at_start = prev < 0 || prev == t->bos_id;
    if (t->kind == TOK_SENTENCEPIECE && (t->flags & FLAG_ADD_DUMMY_PREFIX) && at_start &&
        t->piece_len[token] >= 3 && !memcmp(t->piece[token], SPACE_MARK, 3) && *len > 0 && s[0] == ' ') {
        // (a control token's piece may start with U+2581 too, but its text is empty: nothing to drop)
        s++;
        (*len)--;
    }
    return s;
}

// Token ids -> text in out (the sum of their text lengths). A model that removes extra whitespace
// cannot have produced leading spaces, so sentencepiece drops all of them; else only the prefix's.
static size_t decode(const Tokenizer *t, const int *ids, int n, char *out) {
    size_t len = 0;
    int strip_all = t->kind == TOK_SENTENCEPIECE && (t->flags & FLAG_REMOVE_EXTRA_WHITESPACES);
    for (int i = 0; i < n; i++) {
        int piece_len, prev = i > 0 && !(strip_all && len == 0) ? ids[i - 1] : -1;
        const char *piece = token_text(t, prev, ids[i], &piece_len);
        memcpy(out + len, piece, piece_len);
        len += piece_len;
    }
    return len;
}

// ----------------------------------------------------------------------------
// Chat templates: messages rendered as the model's template writes them (special tokens spelled
// out), then encoded with special-token parsing for the template's own markers only: what users
// wrote (roles, contents, system prompts) stays text. Rendering is append-only, so a chat can
// extend the KV cache turn by turn.

enum { CHAT_NONE = 0, CHAT_CHATML = 1, CHAT_LLAMA2 = 2, CHAT_LLAMA3 = 3 };

typedef struct {
    int style;             // one of CHAT_*
    int end_of_turn;       // token that ends an assistant reply
    char *default_system;  // used when no system prompt is given
} ChatTemplate;

// A growable string that remembers which of its bytes users wrote.
typedef struct {
    char *s;
    size_t len, cap;
    Span *user;            // (n_user) sorted, disjoint: where encode() matches no control token
    int n_user, user_cap;
} Text;

static void text_free(Text *t) {
    free(t->s);
    free(t->user);
}

static int text_append(Text *t, const char *s, size_t n) {
    if (t->len + n + 1 > t->cap) {
        size_t cap = (t->len + n + 1) * 2;
        char *p = realloc(t->s, cap);
        if (!p) return fail("out of memory building a prompt");
        t->s = p;
        t->cap = cap;
    }
    memcpy(t->s + t->len, s, n);
    t->len += n;
    t->s[t->len] = 0;
    return 0;
}

// Appends n bytes a user wrote.
static int text_append_user(Text *t, const char *s, size_t n) {
    if (n == 0) return 0;
    if (t->n_user == t->user_cap) {
        int cap = t->user_cap ? 2 * t->user_cap : 8;
        Span *p = realloc(t->user, cap * sizeof *p);
        if (!p) return fail("out of memory building a prompt");
        t->user = p;
        t->user_cap = cap;
    }
    t->user[t->n_user++] = (Span){t->len, t->len + n};
    return text_append(t, s, n);
}

static int text_add(Text *t, const char *s) { return text_append(t, s, strlen(s)); }

static int text_add_user(Text *t, const char *s) { return text_append_user(t, s, strlen(s)); }

static int text_add_piece(Text *t, const Tokenizer *tok, int id) {
    return id < 0 ? 0 : text_append(t, tok->piece[id], tok->piece_len[id]);
}

static int is_space_char(char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\v' || c == '\f'; }

// Appends src without its leading and trailing whitespace (jinja's trim, Python's strip), keeping
// which of its bytes users wrote.
static int text_add_trimmed(Text *out, const Text *src) {
    size_t a = 0, b = src->len;
    while (a < b && is_space_char(src->s[a])) a++;
    while (b > a && is_space_char(src->s[b - 1])) b--;
    for (size_t at = a; at < b;) { // template and user pieces in order
        size_t next = b;
        int user = 0;
        for (int k = 0; k < src->n_user; k++) {
            Span u = src->user[k];
            if (u.end <= at || u.start >= b) continue;
            if (u.start <= at) { // at is inside this span
                user = 1;
                next = u.end < b ? u.end : b;
                break;
            }
            if (u.start < next) next = u.start;
        }
        if ((user ? text_append_user : text_append)(out, src->s + at, next - at)) return -1;
        at = next;
    }
    return 0;
}

// A user's string, trimmed.
static int text_add_user_trimmed(Text *out, const char *s) {
    Text t = {0};
    int rc = text_add_user(&t, s) || text_add_trimmed(out, &t) ? -1 : 0;
    text_free(&t);
    return rc;
}

typedef struct { const char *role, *content; } Message;

static int render_chatml(Text *out, const Message *msg, int n, const char *system, int generation_prompt) {
    int rc = 0;
    if (system) rc |= text_add(out, "<|im_start|>system\n") | text_add_user(out, system) | text_add(out, "<|im_end|>\n");
    for (int i = 0; i < n; i++)
        rc |= text_add(out, "<|im_start|>") | text_add_user(out, msg[i].role) | text_add(out, "\n") |
              text_add_user(out, msg[i].content) | text_add(out, "<|im_end|>\n");
    if (generation_prompt) rc |= text_add(out, "<|im_start|>assistant\n");
    return rc ? -1 : 0;
}

// Llama 2: the system prompt goes inside the first [INST]; every exchange is wrapped in BOS/EOS.
static int render_llama2(const Tokenizer *t, Text *out, const Message *msg, int n, const char *system) {
    int rc = 0;
    for (int i = 0; i < n; i++) {
        Text content = {0};
        if (system && i == 0)
            rc |= text_add(&content, "<<SYS>>\n") | text_add_user(&content, system) | text_add(&content, "\n<</SYS>>\n\n");
        rc |= text_add_user(&content, msg[i].content);
        if (!strcmp(msg[i].role, "assistant"))
            rc |= text_add(out, " ") | text_add_trimmed(out, &content) | text_add(out, " ") | text_add_piece(out, t, t->eos_id);
        else
            rc |= text_add_piece(out, t, t->bos_id) | text_add(out, "[INST] ") | text_add_trimmed(out, &content) |
                  text_add(out, " [/INST]");
        text_free(&content);
    }
    return rc ? -1 : 0;
}

static int render_llama3(const Tokenizer *t, Text *out, const Message *msg, int n, const char *system, int start,
                         int generation_prompt) {
    int rc = start ? text_add_piece(out, t, t->bos_id) : 0;
    if (system)
        rc |= text_add(out, "<|start_header_id|>system<|end_header_id|>\n\n") | text_add_user_trimmed(out, system) |
              text_add(out, "<|eot_id|>");
    for (int i = 0; i < n; i++)
        rc |= text_add(out, "<|start_header_id|>") | text_add_user(out, msg[i].role) |
              text_add(out, "<|end_header_id|>\n\n") | text_add_user_trimmed(out, msg[i].content) |
              text_add(out, "<|eot_id|>");
    if (generation_prompt) rc |= text_add(out, "<|start_header_id|>assistant<|end_header_id|>\n\n");
    return rc ? -1 : 0;
}

// Renders messages as text; `start` when they begin the conversation (a leading system message,
// or else the template's default system prompt, applies only there).
static int chat_render(const ChatTemplate *chat, const Tokenizer *t, Text *out, const Message *msg, int n, int start,
                       int generation_prompt) {
    const char *system = NULL;
    for (int i = 0; i < n; i++)
        if (!msg[i].role || !msg[i].content) return fail("message %d has no role or no content", i);
    if (start && n > 0 && !strcmp(msg[0].role, "system")) {
        system = msg[0].content;
        msg++;
        n--;
    } else if (start && chat->default_system && chat->default_system[0]) {
        system = chat->default_system;
    }
    switch (chat->style) {
    case CHAT_CHATML: return render_chatml(out, msg, n, system, generation_prompt);
    case CHAT_LLAMA2: return render_llama2(t, out, msg, n, system);
    case CHAT_LLAMA3: return render_llama3(t, out, msg, n, system, start, generation_prompt);
    default: return fail("this model has no chat template");
    }
}

// Renders and encodes messages after `prefix` (template text); *ids is malloc'd. Returns the token
// count or -1. Only the template's markers become control tokens.
static int chat_encode(const ChatTemplate *chat, const Tokenizer *t, const Message *msg, int n, int start,
                       int generation_prompt, const char *prefix, int **ids) {
    Text text = {0};
    int count = -1;
    *ids = NULL;
    if (text_add(&text, prefix) == 0 && chat_render(chat, t, &text, msg, n, start, generation_prompt) == 0) {
        *ids = malloc(encode_capacity(text.len) * sizeof(int));
        count = *ids ? encode(t, text.s, text.len, 0, 1, text.user, text.n_user, *ids) : fail("out of memory encoding a chat");
    }
    text_free(&text);
    return count;
}

// ----------------------------------------------------------------------------
// File formats and loading: kvc files, llama2.c v0 (legacy) and v1/v2 (magic "ak42") checkpoints,
// llama2.c's tokenizer.bin. Every read goes through a cursor that refuses to step past the end.

// A model: what every sequence shares and nobody writes once it is open.
typedef struct {
    Config config;
    Weights weights;    // pointers into the map
    Tokenizer tokenizer;
    int has_tokenizer;
    ChatTemplate chat;
    void *map;          // the mmap'd checkpoint
    size_t map_size;
} Model;

// Maps a regular, non-empty file read-only. Anything else (a directory, a FIFO, a device) is refused
// before a byte is read, so it can neither block nor be asked for an absurd size.
static void *map_file(const char *path, const char *what, size_t *size) {
    int fd = open(path, O_RDONLY | O_NONBLOCK | O_CLOEXEC); // O_NONBLOCK: opening a FIFO must not wait
    if (fd < 0) {
        fail("cannot open %s %s: %s", what, path, strerror(errno));
        return NULL;
    }
    struct stat st;
    void *map = NULL;
    if (fstat(fd, &st) || !S_ISREG(st.st_mode)) fail("%s %s is not a regular file", what, path);
    else if (st.st_size == 0) fail("%s %s is empty", what, path);
    else if ((map = mmap(NULL, (size_t)st.st_size, PROT_READ, MAP_PRIVATE, fd, 0)) == MAP_FAILED) {
        fail("cannot map %s %s: %s", what, path, strerror(errno));
        map = NULL;
    }
    close(fd);
    *size = map ? (size_t)st.st_size : 0;
    return map;
}

// Bounded reads: every take() checks its extent first and fails with the section's name.
typedef struct {
    const uint8_t *base;
    size_t size;   // bytes readable from base
    size_t pos;
    size_t align;  // tensors start on this boundary (64 in kvc files, 1 in llama2.c's)
    const char *what;
} Cursor;

static const void *take(Cursor *c, size_t bytes, const char *name) {
    size_t start = (c->pos + c->align - 1) / c->align * c->align;
    if (start > c->size || bytes > c->size - start) {
        fail("%s is truncated: %s needs %zu bytes at offset %zu, the %s has %zu", c->what, name, bytes,
             start, c->what, c->size);
        return NULL;
    }
    c->pos = start + bytes;
    return c->base + start;
}

static int take_u32(Cursor *c, uint32_t *v, const char *name) {
    const void *p = take(c, 4, name);
    if (!p) return -1;
    memcpy(v, p, 4);
    return 0;
}

// Takes `count` matrices of rows x cols stored as `type`: fp32 values; int8 values, then their fp32
// scales; or 4-bit values, then their fp16 scales (and, q4_1, their fp16 mins). Each part starts
// on the cursor's alignment. A type the rows do not fit is an error naming the tensor.
static int take_matrix(Cursor *c, int type, int group_size, size_t count, size_t rows, size_t cols, const char *name,
                       Matrix *m) {
    size_t numel = count * rows * cols;
    memset(m, 0, sizeof *m);
    m->type = type;
    if (type == WEIGHT_F32) return (m->f = take(c, numel * sizeof(float), name)) ? 0 : -1;
    if (type < 0 || type >= N_WEIGHT_TYPES) return fail("bad header: %s has unknown weight type %d", name, type);
    m->group_size = type == WEIGHT_Q8_0 ? group_size : Q4_BLOCK;
    if (m->group_size <= 0 || m->group_size > MAX_GROUP || cols % m->group_size)
        return type == WEIGHT_Q8_0
                   ? fail("bad header: group_size = %d does not divide %s's rows of %zu", group_size, name, cols)
                   : fail("bad header: %s's rows of %zu are not whole %s blocks of %d", name, cols,
                          WEIGHT_TYPE_NAMES[type], Q4_BLOCK);
    size_t groups = numel / m->group_size;
    if (type == WEIGHT_Q8_0)
        return (m->q = take(c, numel, name)) && (m->scale = take(c, groups * sizeof(float), name)) ? 0 : -1;
    if (!(m->q4 = take(c, numel / 2, name)) || !(m->d = take(c, groups * sizeof(uint16_t), name))) return -1;
    return type == WEIGHT_Q4_0 || (m->m = take(c, groups * sizeof(uint16_t), name)) ? 0 : -1;
}

static int take_floats(Cursor *c, size_t n, const char *name, const float **out) {
    return (*out = take(c, n * sizeof(float), name)) ? 0 : -1;
}

static int take_attention(Cursor *c, const Config *p, const WeightTypes *t, Weights *w) {
    size_t L = p->n_layers, dim = p->dim;
    int gs = t->group_size;
    if (take_matrix(c, t->wq, gs, L, q_dim(p), dim, "wq", &w->wq)) return -1;
    if (take_matrix(c, t->wk, gs, L, kv_dim(p), dim, "wk", &w->wk)) return -1;
    if (take_matrix(c, t->wv, gs, L, kv_dim(p), dim, "wv", &w->wv)) return -1;
    return take_matrix(c, t->wo, gs, L, dim, q_dim(p), "wo", &w->wo);
}

static int take_ffn(Cursor *c, const Config *p, const WeightTypes *t, Weights *w) {
    size_t L = p->n_layers, dim = p->dim, hid = p->hidden_dim;
    int gs = t->group_size;
    if (take_matrix(c, t->w1, gs, L, hid, dim, "w1", &w->w1)) return -1;
    if (take_matrix(c, t->w2, gs, L, dim, hid, "w2", &w->w2)) return -1;
    return take_matrix(c, t->w3, gs, L, hid, dim, "w3", &w->w3);
}

static int take_embeddings(Cursor *c, const Config *p, const WeightTypes *t, Weights *w) {
    return take_matrix(c, t->tok_embeddings, t->group_size, 1, p->vocab_size, p->dim, "tok_embeddings",
                       &w->tok_embeddings);
}

// kvc files and llama2.c v0 store embeddings first and each norm before its matrices.
static int take_weights_embeddings_first(Cursor *c, const Config *p, const WeightTypes *t, Weights *w) {
    size_t norms = (size_t)p->n_layers * p->dim;
    if (take_embeddings(c, p, t, w)) return -1;
    if (take_floats(c, norms, "rms_att", &w->rms_att) || take_attention(c, p, t, w)) return -1;
    if (take_floats(c, norms, "rms_ffn", &w->rms_ffn) || take_ffn(c, p, t, w)) return -1;
    return take_floats(c, p->dim, "rms_final", &w->rms_final);
}

// llama2.c v1/v2 store the norms first.
static int take_weights_norms_first(Cursor *c, const Config *p, const WeightTypes *t, Weights *w) {
    size_t norms = (size_t)p->n_layers * p->dim;
    if (take_floats(c, norms, "rms_att", &w->rms_att) || take_floats(c, norms, "rms_ffn", &w->rms_ffn)) return -1;
    if (take_floats(c, p->dim, "rms_final", &w->rms_final)) return -1;
    if (take_embeddings(c, p, t, w)) return -1;
    return take_attention(c, p, t, w) || take_ffn(c, p, t, w) ? -1 : 0;
}

// The classifier (tok_embeddings itself when shared), then what the matrices' types ask of the
// matmul inputs: the quantized matrices must agree on one int8 group for them.
static int take_classifier(Cursor *c, const Config *p, const WeightTypes *t, Weights *w) {
    if (p->shared_classifier) {
        if (t->wcls != t->tok_embeddings)
            return fail("bad header: the shared classifier's type %d is not tok_embeddings' %d", t->wcls,
                        t->tok_embeddings);
        w->wcls = w->tok_embeddings;
    } else if (take_matrix(c, t->wcls, t->group_size, 1, p->vocab_size, p->dim, "wcls", &w->wcls)) {
        return -1;
    }
    const Matrix *all[] = {&w->tok_embeddings, &w->wq, &w->wk, &w->wv, &w->wo, &w->w1, &w->w2, &w->w3, &w->wcls};
    int has_q8 = 0;
    w->input_group = w->input_sums = 0;
    for (size_t i = 0; i < sizeof all / sizeof all[0]; i++) {
        const Matrix *m = all[i];
        if (m->type == WEIGHT_F32) continue;
        has_q8 |= m->type == WEIGHT_Q8_0;
        w->input_sums |= m->type != WEIGHT_Q8_0;
        if (w->input_group && m->group_size != w->input_group)
            return fail("bad header: q8_0 groups of %d cannot be mixed with q4 blocks of %d", t->group_size, Q4_BLOCK);
        w->input_group = m->group_size;
    }
    if (!has_q8 && t->group_size) return fail("bad header: group_size = %d but no matrix is q8_0", t->group_size);
    return 0;
}

// The tokenizer section of a kvc file: a header of 8 uint32, then per token (f32 score, u32 type,
// u32 length, bytes), then byte-level BPE merges as (u32 left, u32 right) pairs in rank order.
static int tokenizer_read_section(Tokenizer *t, Cursor *c, const Config *p) {
    uint32_t h[8];
    for (int i = 0; i < 8; i++) if (take_u32(c, &h[i], "tokenizer header")) return -1;
    // every value is checked as the unsigned it is stored as, before any becomes an int
    if (h[0] != TOK_SENTENCEPIECE && h[0] != TOK_BYTE_BPE) return fail("tokenizer: unknown kind %u", h[0]);
    if (h[1] != (uint32_t)p->vocab_size)
        return fail("tokenizer has %u tokens but the model's vocab is %d", h[1], p->vocab_size);
    if (h[2] & ~KNOWN_TOKENIZER_FLAGS) return fail("tokenizer: unknown flags 0x%x", h[2]);
    if (h[3] > PRETOK_LLAMA3) return fail("tokenizer: unknown pre-tokenizer %u", h[3]);
    if (h[4] > h[1]) return fail("tokenizer: unk id %u outside the vocab", h[4] - 1); // stored as id + 1, 0: none
    uint32_t n_merges = h[5];
    t->kind = (int)h[0];
    t->flags = (int)h[2];
    t->pretokenizer = (int)h[3];
    t->unk_id = (int)h[4] - 1;
    if (tokenizer_alloc(t, (int)h[1])) return -1;
    for (int i = 0; i < t->n_tokens; i++) {
        const uint8_t *rec = take(c, 12, "token record");
        if (!rec) return -1;
        uint32_t type, len;
        memcpy(&t->score[i], rec, 4);
        memcpy(&type, rec + 4, 4);
        memcpy(&len, rec + 8, 4);
        if (len > MAX_PIECE_BYTES) return fail("tokenizer: token %d claims %u bytes", i, len);
        if (type < PIECE_NORMAL || type > PIECE_BYTE) return fail("tokenizer: token %d has unknown type %u", i, type);
        t->type[i] = (int)type;
        t->piece_len[i] = (int)len;
        if (!(t->piece[i] = take(c, len, "token bytes"))) return -1;
    }
    if (n_merges > (1u << 24)) return fail("tokenizer: %u merges is absurd", n_merges);
    const uint32_t *pairs = take(c, (size_t)n_merges * 8, "merges");
    if (!pairs) return -1;
    if (tokenizer_index(t)) return -1;
    return t->kind == TOK_BYTE_BPE ? tokenizer_index_merges(t, pairs, (int)n_merges) : 0;
}

// llama2.c's tokenizer.bin: u32 max_token_length, then per token (f32 score, u32 length, bytes).
// It stores U+2581 as a plain space and has no types: ids 0/1/2 are unk/bos/eos, <0xNN> are bytes.
static int tokenizer_read_llama2c(Tokenizer *t, const char *path, int vocab_size) {
    size_t size;
    const uint8_t *data = map_file(path, "tokenizer", &size);
    if (!data) return -1;
    if (size < 4 || (size - 4) / (8 + MAX_PIECE_BYTES) > (size_t)vocab_size) { // before the 3x allocation below
        munmap((void *)data, size);
        return size < 4 ? fail("tokenizer %s is truncated", path)
                        : fail("tokenizer %s is %zu bytes, more than %d tokens can take: it does not fit this model",
                               path, size, vocab_size);
    }
    // pieces are rewritten with spaces escaped as U+2581: at most 3x the file
    char *pieces = t->piece_buffer = malloc(3 * size + 1);
    t->kind = TOK_SENTENCEPIECE;
    t->flags = FLAG_ADD_DUMMY_PREFIX | FLAG_BYTE_FALLBACK | FLAG_ADD_BOS;
    t->unk_id = 0;
    int rc = -1;
    if (tokenizer_alloc(t, vocab_size)) goto done;
    if (!pieces) { fail("out of memory for the tokenizer"); goto done; }
    Cursor c = {data, size, 4, 1, "tokenizer"};
    char *out = pieces;
    for (int i = 0; i < vocab_size; i++) {
        const uint8_t *rec = take(&c, 8, "token record");
        if (!rec) goto done;
        uint32_t len;
        memcpy(&t->score[i], rec, 4);
        memcpy(&len, rec + 4, 4);
        const char *s = take(&c, len, "token bytes");
        if (!s) goto done;
        t->piece[i] = out;
        for (uint32_t j = 0; j < len; j++) {
            if (s[j] == ' ') { memcpy(out, SPACE_MARK, 3); out += 3; }
            else *out++ = s[j];
        }
        if (out - t->piece[i] > MAX_PIECE_BYTES) { fail("tokenizer: token %d is longer than %d bytes", i, MAX_PIECE_BYTES); goto done; }
        t->piece_len[i] = (int)(out - t->piece[i]);
        t->type[i] = i == 0 ? PIECE_UNKNOWN : i <= 2 ? PIECE_CONTROL
                   : parse_byte_piece(t->piece[i], t->piece_len[i]) >= 0 ? PIECE_BYTE : PIECE_NORMAL;
    }
    if (c.pos != c.size) { fail("tokenizer %s has %zu bytes after its %d tokens: it does not fit this model", path, c.size - c.pos, vocab_size); goto done; }
    if (tokenizer_index(t) == 0) rc = 0;
done:
    munmap((void *)data, size);
    return rc;
}

#define KVC_MAGIC "KVCM"
#define KVC_VERSION 2               // 2: a weight type per matrix (1: one for all, f32 or q8_0)
#define KVC_HEADER_BYTES 256         // the header's room in the file; KvcHeader uses the first 152
#define LLAMA2C_MAGIC 0x616b3432u    // "ak42": llama2.c's v1/v2 files
#define LLAMA2C_HEADER_BYTES 256     // v1/v2
#define LLAMA2C_LEGACY_HEADER_BYTES 28 // v0: 7 int32

typedef struct { uint64_t offset, size; } Section;

// The kvc header as it lies in the file (little-endian). kvc/format.py's HEADER_FIELDS is the
// source of this layout; tests/test_format_layout.py checks that the two agree, byte by byte.
typedef struct {
    char magic[4];           // KVC_MAGIC
    uint32_t version;        // KVC_VERSION
    Config config;           // the hyperparameters, in Config's field order
    int32_t reserved;
    Section tokenizer, chat, weights;
    WeightTypes types;       // how each matrix of the weights section is stored
} KvcHeader;
_Static_assert(sizeof(KvcHeader) <= KVC_HEADER_BYTES, "the kvc header outgrew its room");

static int read_i32(const uint8_t *p) { int32_t v; memcpy(&v, p, 4); return v; }

static int section_cursor(const Model *m, Section s, const char *name, size_t align, Cursor *c) {
    if (s.offset < KVC_HEADER_BYTES)
        return fail("bad header: the %s section starts at %llu, inside the %d-byte header", name,
                    (unsigned long long)s.offset, KVC_HEADER_BYTES);
    if (s.offset > m->map_size || s.size > m->map_size - s.offset)
        return fail("bad header: the %s section (%llu bytes at %llu) runs past the end of the %zu-byte file", name,
                    (unsigned long long)s.size, (unsigned long long)s.offset, m->map_size);
    if (s.offset % align) return fail("bad header: the %s section is not %zu-byte aligned", name, align);
    *c = (Cursor){(const uint8_t *)m->map + s.offset, s.size, 0, align, name};
    return 0;
}

// The template section: u32 style, i32 end-of-turn token, then the default system prompt and the
// jinja source, each a u32 length and bytes (run.c renders by style; the jinja is for Python).
static int chat_read_section(ChatTemplate *chat, Cursor *c, const Config *p) {
    uint32_t style, end_of_turn, len;
    if (take_u32(c, &style, "style") || take_u32(c, &end_of_turn, "end of turn") || take_u32(c, &len, "system prompt"))
        return -1;
    const char *system = take(c, len, "system prompt");
    if (!system) return -1;
    if (style > CHAT_LLAMA3) return fail("chat template: unknown style %u", style);
    if (end_of_turn != UINT32_MAX && end_of_turn >= (uint32_t)p->vocab_size) // UINT32_MAX: -1, none
        return fail("chat template: end-of-turn token %u outside the vocab", end_of_turn);
    chat->style = (int)style;
    chat->end_of_turn = (int)end_of_turn;
    if (!(chat->default_system = alloc_zeroed(len + 1, 1))) return -1;
    memcpy(chat->default_system, system, len);
    return 0;
}

// A kvc weights section may end with one more tensor, float32 key_mean (n_layers, n_kv_heads,
// head_dim): each kv head's mean key after RoPE, which an iq4_nl cache takes from every key before
// storing it. The section's size says whether it is there; the rest of the section must be it.
static int take_key_mean(Cursor *c, const Config *p, Weights *w) {
    size_t n = (size_t)p->n_layers * kv_dim(p), start = (c->pos + c->align - 1) / c->align * c->align;
    if (c->pos == c->size) return 0;
    if (start > c->size || c->size - start != n * sizeof(float))
        return fail("bad header: the weights section is %zu bytes but the dims need %zu (%zu with key_mean)", c->size,
                    c->pos, start + n * sizeof(float));
    if (take_floats(c, n, "key_mean", &w->key_mean)) return -1;
    for (size_t i = 0; i < n; i++)
        if (!isfinite(w->key_mean[i]))
            return fail("bad key_mean: value %zu (layer %zu) is %g", i, i / kv_dim(p), w->key_mean[i]);
    return 0;
}

static int open_kvc(Model *m) {
    const uint8_t *h = m->map;
    Config *p = &m->config;
    if (m->map_size < KVC_HEADER_BYTES) return fail("checkpoint is truncated: %zu bytes, less than its header", m->map_size);
    KvcHeader hdr;
    memcpy(&hdr, h, sizeof hdr);
    if (hdr.version != KVC_VERSION)
        return fail("unsupported kvc file version %d (this build reads %d)", (int)hdr.version, KVC_VERSION);
    *p = hdr.config;
    if (check_config(p)) return -1;
    Section tokenizer = hdr.tokenizer, chat = hdr.chat, weights = hdr.weights;
    Cursor c;
    if (section_cursor(m, weights, "weights", 64, &c)) return -1;
    if (take_weights_embeddings_first(&c, p, &hdr.types, &m->weights) || take_classifier(&c, p, &hdr.types, &m->weights) ||
        take_key_mean(&c, p, &m->weights))
        return -1;
    if (section_cursor(m, chat, "chat template", 1, &c) || chat_read_section(&m->chat, &c, p)) return -1;
    if (tokenizer.size == 0) return 0;
    if (section_cursor(m, tokenizer, "tokenizer", 1, &c)) return -1;
    m->tokenizer.bos_id = p->bos_id;
    m->tokenizer.eos_id = p->eos_id;
    if (tokenizer_read_section(&m->tokenizer, &c, p)) return -1;
    m->has_tokenizer = 1;
    return 0;
}

// Both llama2.c headers hold 7 int32 (dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size,
// seq_len) at `dims`; the rest is llama2.c's fixed choice: theta 1e4, eps 1e-5, bos 1, eos 2,
// head_dim = dim / n_heads. A negative vocab_size means an unshared classifier in v0 files.
static int llama2c_config(Config *p, const uint8_t *dims, int shared_classifier) {
    int vocab = read_i32(dims + 20);
    *p = (Config){read_i32(dims), read_i32(dims + 4), read_i32(dims + 8), read_i32(dims + 12), read_i32(dims + 16), 0,
                  vocab == INT32_MIN ? 0 : abs(vocab), read_i32(dims + 24), 10000.0f, 1e-5f, shared_classifier, 1, 2};
    if (p->n_heads <= 0 || p->dim % p->n_heads)
        return fail("not a kvc or llama2.c checkpoint (dim %d, n_heads %d)", p->dim, p->n_heads);
    p->head_dim = p->dim / p->n_heads;
    return check_config(p);
}

// llama2.c's files store every matrix in one type: fp32 (v0, v1) or int8 in groups (v2).
static WeightTypes uniform_types(int type, int group_size) {
    return (WeightTypes){group_size, type, type, type, type, type, type, type, type, type};
}

// llama2.c's v1 (fp32) and v2 (int8, groups) files: a 256-byte header, norms first, no padding.
static int open_llama2c_versioned(Model *m) {
    const uint8_t *h = m->map;
    if (m->map_size < LLAMA2C_HEADER_BYTES)
        return fail("checkpoint is truncated: %zu bytes, less than its header", m->map_size);
    int version = read_i32(h + 4);
    if (version != 1 && version != 2) return fail("unsupported llama2.c file version %d", version);
    Config *p = &m->config;
    if (llama2c_config(p, h + 8, h[36])) return -1;
    WeightTypes t = version == 1 ? uniform_types(WEIGHT_F32, 0) : uniform_types(WEIGHT_Q8_0, read_i32(h + 37));
    Cursor c = {m->map, m->map_size, LLAMA2C_HEADER_BYTES, 1, "checkpoint"};
    if (take_weights_norms_first(&c, p, &t, &m->weights) || take_classifier(&c, p, &t, &m->weights)) return -1;
    if (c.pos != c.size) return fail("checkpoint has %zu bytes more than its header describes", c.size - c.pos);
    return 0;
}

// llama2.c's original files: 7 int32 then fp32 tensors; a negative vocab means an unshared classifier.
static int open_llama2c_legacy(Model *m) {
    const uint8_t *h = m->map;
    Config *p = &m->config;
    if (m->map_size < LLAMA2C_LEGACY_HEADER_BYTES)
        return fail("checkpoint is truncated: %zu bytes, less than a llama2.c header", m->map_size);
    if (llama2c_config(p, h, read_i32(h + 20) > 0)) return -1;
    WeightTypes t = uniform_types(WEIGHT_F32, 0);
    Cursor c = {m->map, m->map_size, LLAMA2C_LEGACY_HEADER_BYTES, 1, "checkpoint"};
    if (take_weights_embeddings_first(&c, p, &t, &m->weights)) return -1;
    if (!take(&c, (size_t)p->seq_len * p->head_dim * sizeof(float), "freq_cis")) return -1; // unused RoPE tables
    if (take_classifier(&c, p, &t, &m->weights)) return -1;
    if (c.pos != c.size) return fail("checkpoint has %zu bytes more than its header describes", c.size - c.pos);
    return 0;
}

static void model_close(Model *m) {
    if (m->map) munmap(m->map, m->map_size);
    tokenizer_free(&m->tokenizer);
    free(m->chat.default_system);
    memset(m, 0, sizeof *m);
}

// Maps the checkpoint and checks every header value and extent; tokenizer_path (or NULL) names a
// llama2.c tokenizer.bin.
static int model_open(Model *m, const char *checkpoint, const char *tokenizer_path) {
    memset(m, 0, sizeof *m);
    if (!(m->map = map_file(checkpoint, "checkpoint", &m->map_size))) return -1;
    const uint8_t *h = m->map;
    uint32_t magic = m->map_size >= 4 ? (uint32_t)read_i32(h) : 0;
    int rc = m->map_size >= 4 && !memcmp(h, KVC_MAGIC, 4) ? open_kvc(m)
           : magic == LLAMA2C_MAGIC ? open_llama2c_versioned(m) : open_llama2c_legacy(m);
    if (rc == 0 && tokenizer_path) {
        tokenizer_free(&m->tokenizer);
        m->tokenizer.bos_id = m->config.bos_id;
        m->tokenizer.eos_id = m->config.eos_id;
        rc = tokenizer_read_llama2c(&m->tokenizer, tokenizer_path, m->config.vocab_size);
        m->has_tokenizer = rc == 0;
    }
    if (rc) {
        char message[sizeof error_message]; // closing must not lose the reason
        snprintf(message, sizeof message, "%s", error_message);
        model_close(m);
        snprintf(error_message, sizeof error_message, "%s", message);
    }
    return rc;
}

// ----------------------------------------------------------------------------
// Kernels: dot products, matmuls (fp32 and int8), norms, softmax; SIMD with portable fallbacks

// Activations quantized like Q8_0 weights: int8 values, one scale per group of the row's length.
typedef struct {
    int8_t *q;          // (tokens, in) values, padded by 64 bytes: the AVX-512 kernel reads whole 64s
    float *scale;       // (tokens, in / group_size)
    float *sum;         // (tokens, in / group_size) each group's scale times the sum of its values (the
                        // q4 kernels' offset term), or NULL when no weights need it
    float *lane_scale;  // (tokens, 16 * ceil(in / 64)): for each 64 values, the scale of the first 32
                        // in lanes 0-7 and of the next 32 in lanes 8-15, as the AVX-512 kernel uses them
} QuantizedRows;

static size_t lane_scales_per_row(int n) { return 16 * (size_t)((n + 63) / 64); }

static float dot(const float *a, const float *b, int n) {
#if defined(__AVX512F__)
    __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
    int i = 0;
    for (; i + 32 <= n; i += 32) {
        acc0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), acc0);
        acc1 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i + 16), _mm512_loadu_ps(b + i + 16), acc1);
    }
    if (i + 16 <= n) {
        acc0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), acc0);
        i += 16;
    }
    if (i < n) { // masked tail: no scalar loop
        __mmask16 m = (__mmask16)((1u << (n - i)) - 1);
        acc1 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, a + i), _mm512_maskz_loadu_ps(m, b + i), acc1);
    }
    return _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
#else
    float s0 = 0, s1 = 0, s2 = 0, s3 = 0; // independent sums let the compiler pipeline
    int i = 0;
    for (; i + 4 <= n; i += 4) {
        s0 += a[i] * b[i];
        s1 += a[i + 1] * b[i + 1];
        s2 += a[i + 2] * b[i + 2];
        s3 += a[i + 3] * b[i + 3];
    }
    for (; i < n; i++) s0 += a[i] * b[i];
    return (s0 + s1) + (s2 + s3);
#endif
}

#if defined(__AVX512F__)
// 16 vectors in, one out: lane r holds the sum of v[r]'s lanes (16 sums across lanes in 15 steps
// of shuffles and adds, instead of 16 reductions of 4 steps each).
static inline __m512 sum16(const __m512 *v) {
    __m512 a[8], b[4], c[2];
    for (int i = 0; i < 8; i++) // lanes 0-7: v[2i]'s halves added, 8-15: v[2i + 1]'s
        a[i] = _mm512_add_ps(_mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0x44), _mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0xEE));
    for (int i = 0; i < 4; i++) // quarter k: four partial sums of v[4i + k]
        b[i] = _mm512_add_ps(_mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], 0x88), _mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], 0xDD));
    for (int i = 0; i < 2; i++)
        c[i] = _mm512_add_ps(_mm512_unpacklo_ps(b[2 * i], b[2 * i + 1]), _mm512_unpackhi_ps(b[2 * i], b[2 * i + 1]));
    __m512 d = _mm512_add_ps(_mm512_unpacklo_ps(c[0], c[1]), _mm512_unpackhi_ps(c[0], c[1])); // quarter k: v[k], v[8+k], v[4+k], v[12+k]
    return _mm512_permutexvar_ps(_mm512_setr_epi32(0, 4, 8, 12, 2, 6, 10, 14, 1, 5, 9, 13, 3, 7, 11, 15), d);
}

// The 16 dot products of a block of 4 weight rows x 4 tokens, from their accumulators (row-major),
// into out[row][token]: one sum16 instead of 16 reductions.
static inline void store_sums4x4(const __m512 acc[16], float out[4][4]) { _mm512_storeu_ps(&out[0][0], sum16(acc)); }
#endif

// Quantizes one group: its scale is max|x| / 127 (0 for an all-zero group, which stays zero).
static float quantize_group(int8_t *q, const float *x, int n) {
    float amax = 0;
    int j = 0;
#if defined(__AVX512F__)
    if (n % 16 == 0) {
        __m512 m = _mm512_setzero_ps();
        for (; j < n; j += 16) m = _mm512_max_ps(m, _mm512_abs_ps(_mm512_loadu_ps(x + j)));
        amax = _mm512_reduce_max_ps(m);
        float s = amax / 127.0f;
        __m512 inv = _mm512_set1_ps(s > 0 ? 1.0f / s : 0.0f);
        for (j = 0; j < n; j += 16) // rounds to nearest even, as lrintf does
            _mm_storeu_si128((__m128i *)(q + j), _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(x + j), inv))));
        return s;
    }
#endif
    for (; j < n; j++) amax = fmaxf(amax, fabsf(x[j]));
    float s = amax / 127.0f, inv = s > 0 ? 1.0f / s : 0.0f;
    for (j = 0; j < n; j++) q[j] = (int8_t)lrintf(x[j] * inv);
    return s;
}

// Quantizes a row of n values in groups (sum: NULL, or where each group's scaled sum goes).
static void quantize_row(int8_t *q, float *scale, float *sum, float *lane_scale, const float *x, int n, int group_size) {
    for (int g = 0; g < n / group_size; g++) {
        int8_t *qg = q + g * group_size;
        scale[g] = quantize_group(qg, x + g * group_size, group_size);
        if (!sum) continue;
        int32_t total = 0;
        for (int j = 0; j < group_size; j++) total += qg[j];
        sum[g] = scale[g] * (float)total;
    }
    for (int i = 0; i < n; i += 32) // lanes past the end stay 0
        for (int lane = 0; lane < 8; lane++) lane_scale[i / 4 + lane] = scale[i / group_size];
}

// The AVX-512 int8 kernels take groups of 32, 64, 128... (a group index is then a shift away).
static int q8_simd_shift(int group_size) {
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
    if (group_size >= 32 && (group_size & (group_size - 1)) == 0) return __builtin_ctz(group_size);
#endif
    (void)group_size;
    return -1;
}

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
// 64 int8 weights at w + i (32 at the end of a row of n), 128 * their sums per 4 bytes, and their
// group scales spread over lanes 0-7 (first 32 values) and 8-15 (next 32).
static __m512i q8_weights(const int8_t *w, const float *ws, int i, int n, int shift, __m512i *bias, __m512 *scale) {
    __m512i wv = _mm512_maskz_loadu_epi8(n - i >= 64 ? ~0ull : 0xFFFFFFFFull, w + i);
    *bias = _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_set1_epi8((char)0x80), wv);
    float upper = n - i > 32 ? ws[(i + 32) >> shift] : 0.0f;
    *scale = _mm512_insertf32x8(_mm512_set1_ps(ws[i >> shift]), _mm256_set1_ps(upper), 1);
    return wv;
}

// acc + those 64 weights against 64 int8 activations, summed per 4 bytes and scaled. dpbusd
// multiplies unsigned by signed bytes: x goes in as x + 128 (its sign bit flipped) and the
// weights' bias (128 * their sum) comes back off.
static __m512 q8_chunk(__m512 acc, __m512i w, __m512i bias, __m512 w_scale, const int8_t *x, const float *x_lane_scale) {
    __m512i x_unsigned = _mm512_xor_si512(_mm512_loadu_si512(x), _mm512_set1_epi8((char)0x80));
    __m512i sums = _mm512_sub_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), x_unsigned, w), bias);
    return _mm512_fmadd_ps(_mm512_cvtepi32_ps(sums), _mm512_mul_ps(w_scale, _mm512_loadu_ps(x_lane_scale)), acc);
}
#endif

// Decode streams every weight once per token, a row at a time, and the hardware prefetcher stops at
// each 4 KiB page: the decode kernels ask for the weights PREFETCH_AHEAD bytes ahead of what they
// read. SmolLM2's decode on one thread: Q8_0 +20%, Q4_1 +10%, f32 +6%. The quantized kernels spread
// one request per 64 bytes through their loops (a burst per row, before the loop, ran slower there);
// f32 rows ask in one burst before dot, which other callers share. The 4x4 kernels of a batch of
// tokens ask while their first four tokens stream the rows (a step of 4 to 16 tokens was memory-
// latency bound without: SmolLM2 Q8_0, 4 tokens a block, 29 ms against 10 ms for 5 tokens).
#define PREFETCH_AHEAD 4096

// An int8 weight row (scales ws) dotted with token t's int8 activations: int32 sums per group,
// scaled in fp32.
static float dot_q8(const int8_t *w, const float *ws, const QuantizedRows *xq, int t, int n, int group_size) {
    const int8_t *x = xq->q + (size_t)t * n;
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
    int shift = q8_simd_shift(group_size);
    if (shift >= 0) {
        const float *lanes = xq->lane_scale + (size_t)t * lane_scales_per_row(n);
        __m512 acc = _mm512_setzero_ps();
        for (int i = 0; i < n; i += 64) {
            __m512i bias;
            __m512 w_scale;
            __builtin_prefetch(w + i + PREFETCH_AHEAD);
            __m512i wv = q8_weights(w, ws, i, n, shift, &bias, &w_scale);
            acc = q8_chunk(acc, wv, bias, w_scale, x + i, lanes + i / 4);
        }
        return _mm512_reduce_add_ps(acc);
    }
#endif
    const float *xs = xq->scale + (size_t)t * (n / group_size);
    float sum = 0;
    for (int g = 0; g < n / group_size; g++) {
        int32_t s = 0;
        for (int j = g * group_size; j < (g + 1) * group_size; j++) s += w[j] * x[j];
        sum += s * ws[g] * xs[g];
    }
    return sum;
}

static float f16_to_f32(uint16_t h); // IEEE half to float, exactly (with the KV cache's types below)

#define Q4_SPAN (16 * Q4_BLOCK) // values whose block scales the AVX-512 q4 kernels convert at once

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
// 64 4-bit weights (two blocks) from byte i/2 of a q4 row of n as 64 unsigned bytes in value order,
// unpacked in registers; 32 (upper half zero) at the end of a row. A block's 16 bytes hold its values
// 0-15 in their low nibbles and 16-31 in their high ones: each 16 bytes go to two 128-bit lanes, the
// second shifted down by 4, then both masked to 4 bits.
static __m512i q4_weights(const uint8_t *w, int i, int n) {
    __m512i packed = n - i >= 64 ? _mm512_zextsi256_si512(_mm256_loadu_si256((const __m256i *)(w + i / 2)))
                                 : _mm512_zextsi128_si512(_mm_loadu_si128((const __m128i *)(w + i / 2)));
    __m512i lanes = _mm512_permutexvar_epi64(_mm512_setr_epi64(0, 1, 0, 1, 2, 3, 2, 3), packed);
    lanes = _mm512_srlv_epi64(lanes, _mm512_setr_epi64(0, 0, 4, 4, 0, 0, 4, 4));
    return _mm512_and_si512(lanes, _mm512_set1_epi8(0x0F));
}

// The blocks b.. of a span (at most 16): which of them exist, and their fp16 values (scales or mins) as fp32.
static __mmask16 q4_span_mask(int blocks, int b) {
    return blocks - b >= 16 ? 0xFFFF : (__mmask16)((1u << (blocks - b)) - 1);
}
static __m512 q4_halves(const uint16_t *h, __mmask16 mask) {
    return _mm512_cvtph_ps(_mm512_castsi512_si256(_mm512_maskz_loadu_epi16(mask, h)));
}

// Each block's offset factor: its min (q4_1), or -8 times its scale (q4_0).
static __m512 q4_offset_factors(__m512 d, const uint16_t *m, __mmask16 mask) {
    return m ? q4_halves(m, mask) : _mm512_mul_ps(_mm512_set1_ps(-8.0f), d);
}

// The permute index that puts lane 0 of a span's block values in lanes 0-7 and lane 1 in lanes 8-15:
// the first chunk's two block scales, placed as dpbusd leaves the two blocks' sums. Each chunk after
// it adds 2.
static __m512i q4_pair_index(void) { return _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1); }

// The integer dot products of 64 unpacked weights with 64 int8 activations, per 4 bytes, as floats.
// dpbusd takes the weights as its unsigned operand as they are (0..15).
static __m512 q4_sums(__m512i w, __m512i x) {
    return _mm512_cvtepi32_ps(_mm512_dpbusd_epi32(_mm512_setzero_si512(), w, x));
}
#endif

// A q4 weight row (values w, scales d, mins m or NULL for q4_0) dotted with token t's int8
// activations: sum over blocks of d xscale (q . x) + (m or -8 d) (the block's scaled activation sum).
// The AVX-512 kernel takes 16 blocks (Q4_SPAN values) a step: their scales times the activations'
// in one vector, spread over the chunks by a permute; the offsets with one FMA.
static float dot_q4(const uint8_t *w, const uint16_t *d, const uint16_t *m, const QuantizedRows *xq, int t, int n) {
    int blocks = n / Q4_BLOCK;
    const int8_t *x = xq->q + (size_t)t * n;
    const float *xs = xq->scale + (size_t)t * blocks, *x_sum = xq->sum + (size_t)t * blocks;
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
    __builtin_prefetch(d + 8 * blocks); // the scale and min streams are too thin for the prefetcher
    if (m) __builtin_prefetch(m + 8 * blocks);
    __m512 acc = _mm512_setzero_ps();
    for (int span = 0; span < n; span += Q4_SPAN) {
        int b = span / Q4_BLOCK;
        __mmask16 mask = q4_span_mask(blocks, b);
        __m512 wd = q4_halves(d + b, mask), x_scale = _mm512_maskz_loadu_ps(mask, xs + b);
        __m512 offsets = q4_offset_factors(wd, m ? m + b : NULL, mask);
        acc = _mm512_fmadd_ps(offsets, _mm512_maskz_loadu_ps(mask, x_sum + b), acc);
        __m512 scale = _mm512_mul_ps(wd, x_scale);
        __m512i index = q4_pair_index();
        for (int i = span; i < n && i < span + Q4_SPAN; i += 64) {
            if (i % 128 == 0) __builtin_prefetch(w + i / 2 + PREFETCH_AHEAD); // 64 bytes: two steps' weights
            __m512 sums = q4_sums(q4_weights(w, i, n), _mm512_loadu_si512(x + i));
            acc = _mm512_fmadd_ps(sums, _mm512_permutexvar_ps(index, scale), acc);
            index = _mm512_add_epi32(index, _mm512_set1_epi32(2));
        }
    }
    return _mm512_reduce_add_ps(acc);
#else
    float sum = 0;
    for (int b = 0; b < blocks; b++) {
        const uint8_t *wb = w + b * (Q4_BLOCK / 2);
        const int8_t *xb = x + b * Q4_BLOCK;
        int32_t s = 0;
        for (int j = 0; j < Q4_BLOCK / 2; j++) s += (wb[j] & 15) * xb[j] + (wb[j] >> 4) * xb[j + Q4_BLOCK / 2];
        float scale = f16_to_f32(d[b]);
        sum += scale * xs[b] * (float)s + (m ? f16_to_f32(m[b]) : -8.0f * scale) * x_sum[b];
    }
    return sum;
#endif
}

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
// One q4 row's 64 weights, unpacked once, against four tokens' activations (x_scale: the tokens'
// block scales for them): the inner step of dot4x4_q4.
static inline void q4_row_x4(const uint8_t *w, __m512 w_scale, int i, int n, const __m512i x[4], const __m512 x_scale[4],
                             __m512 *a0, __m512 *a1, __m512 *a2, __m512 *a3) {
    __m512i wv = q4_weights(w, i, n);
    *a0 = _mm512_fmadd_ps(q4_sums(wv, x[0]), _mm512_mul_ps(w_scale, x_scale[0]), *a0);
    *a1 = _mm512_fmadd_ps(q4_sums(wv, x[1]), _mm512_mul_ps(w_scale, x_scale[1]), *a1);
    *a2 = _mm512_fmadd_ps(q4_sums(wv, x[2]), _mm512_mul_ps(w_scale, x_scale[2]), *a2);
    *a3 = _mm512_fmadd_ps(q4_sums(wv, x[3]), _mm512_mul_ps(w_scale, x_scale[3]), *a3);
}

// acc[k] + the offset terms of one q4 row's span against four tokens' scaled activation sums.
static inline void q4_offsets_x4(__m512 factors, const __m512 x_sum[4], __m512 *a0, __m512 *a1, __m512 *a2, __m512 *a3) {
    *a0 = _mm512_fmadd_ps(factors, x_sum[0], *a0);
    *a1 = _mm512_fmadd_ps(factors, x_sum[1], *a1);
    *a2 = _mm512_fmadd_ps(factors, x_sum[2], *a2);
    *a3 = _mm512_fmadd_ps(factors, x_sum[3], *a3);
}
#endif

// Four q4 rows (row stride n values) against tokens t..t+3, as dot4x4_q8 does for int8 rows, a
// span of 16 blocks at a time as in dot_q4. Returns 0 where there is no such kernel (no AVX-512 VNNI).
static int dot4x4_q4(const uint8_t *w, const uint16_t *d, const uint16_t *m, const QuantizedRows *xq, int t, int n,
                     float out[4][4]) {
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
    int blocks = n / Q4_BLOCK;
    size_t bytes = n / 2;
    __m512 r00 = _mm512_setzero_ps(), r01 = r00, r02 = r00, r03 = r00, r10 = r00, r11 = r00, r12 = r00, r13 = r00,
           r20 = r00, r21 = r00, r22 = r00, r23 = r00, r30 = r00, r31 = r00, r32 = r00, r33 = r00;
    for (int span = 0; span < n; span += Q4_SPAN) {
        int b = span / Q4_BLOCK;
        __mmask16 mask = q4_span_mask(blocks, b);
        __m512 wd[4], xs[4], x_sum[4];
        for (int k = 0; k < 4; k++) {
            const size_t at = (size_t)(t + k) * blocks + b;
            xs[k] = _mm512_maskz_loadu_ps(mask, xq->scale + at);
            x_sum[k] = _mm512_maskz_loadu_ps(mask, xq->sum + at);
            wd[k] = q4_halves(d + (size_t)k * blocks + b, mask); // row k's scales
        }
        q4_offsets_x4(q4_offset_factors(wd[0], m ? m + b : NULL, mask), x_sum, &r00, &r01, &r02, &r03);
        q4_offsets_x4(q4_offset_factors(wd[1], m ? m + blocks + b : NULL, mask), x_sum, &r10, &r11, &r12, &r13);
        q4_offsets_x4(q4_offset_factors(wd[2], m ? m + 2 * blocks + b : NULL, mask), x_sum, &r20, &r21, &r22, &r23);
        q4_offsets_x4(q4_offset_factors(wd[3], m ? m + 3 * blocks + b : NULL, mask), x_sum, &r30, &r31, &r32, &r33);
        __m512i index = q4_pair_index();
        for (int i = span; i < n && i < span + Q4_SPAN; i += 64) {
            __m512i x[4];
            __m512 x_scale[4];
            for (int k = 0; k < 4 && t == 0 && i % 128 == 0; k++) __builtin_prefetch(w + k * bytes + i / 2 + PREFETCH_AHEAD);
            for (int k = 0; k < 4; k++) {
                x[k] = _mm512_loadu_si512(xq->q + (size_t)(t + k) * n + i);
                x_scale[k] = _mm512_permutexvar_ps(index, xs[k]);
            }
            q4_row_x4(w, _mm512_permutexvar_ps(index, wd[0]), i, n, x, x_scale, &r00, &r01, &r02, &r03);
            q4_row_x4(w + bytes, _mm512_permutexvar_ps(index, wd[1]), i, n, x, x_scale, &r10, &r11, &r12, &r13);
            q4_row_x4(w + 2 * bytes, _mm512_permutexvar_ps(index, wd[2]), i, n, x, x_scale, &r20, &r21, &r22, &r23);
            q4_row_x4(w + 3 * bytes, _mm512_permutexvar_ps(index, wd[3]), i, n, x, x_scale, &r30, &r31, &r32, &r33);
            index = _mm512_add_epi32(index, _mm512_set1_epi32(2));
        }
    }
    __m512 acc[16] = {r00, r01, r02, r03, r10, r11, r12, r13, r20, r21, r22, r23, r30, r31, r32, r33};
    store_sums4x4(acc, out);
    return 1;
#else
    (void)w, (void)d, (void)m, (void)xq, (void)t, (void)n, (void)out;
    return 0;
#endif
}

// One weight row against 4 tokens' activations at once: each weight load feeds 4 FMAs (prefill).
static void dot4(const float *w, const float *x, size_t stride, int n, float out[4]) {
#if defined(__AVX512F__)
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps(), a2 = _mm512_setzero_ps(), a3 = _mm512_setzero_ps();
    for (int i = 0; i < n; i += 16) {
        __mmask16 m = n - i >= 16 ? 0xFFFF : (__mmask16)((1u << (n - i)) - 1);
        __m512 wv = _mm512_maskz_loadu_ps(m, w + i);
        a0 = _mm512_fmadd_ps(wv, _mm512_maskz_loadu_ps(m, x + i), a0);
        a1 = _mm512_fmadd_ps(wv, _mm512_maskz_loadu_ps(m, x + stride + i), a1);
        a2 = _mm512_fmadd_ps(wv, _mm512_maskz_loadu_ps(m, x + 2 * stride + i), a2);
        a3 = _mm512_fmadd_ps(wv, _mm512_maskz_loadu_ps(m, x + 3 * stride + i), a3);
    }
    out[0] = _mm512_reduce_add_ps(a0);
    out[1] = _mm512_reduce_add_ps(a1);
    out[2] = _mm512_reduce_add_ps(a2);
    out[3] = _mm512_reduce_add_ps(a3);
#else
    for (int t = 0; t < 4; t++) out[t] = dot(w, x + t * stride, n);
#endif
}

// A matmul's output: out (n x rows) = x W^T, or out += x W^T when accumulate (residual adds).
// With rope set, each finished block of rows is rotated by RoPE (queries and keys).
typedef struct {
    int half;             // head_dim / 2: RoPE rotates pairs (2j, 2j+1) of each head
    float *cos, *sin;     // (tokens, half) for a block's positions
} Rope;

typedef struct {
    float *out;
    Matrix w;
    int rows;
    int accumulate;
    const Rope *rope;
} Projection;

static float dot_row(Matrix w, int row, const float *x, const QuantizedRows *xq, int t, int in) {
    size_t groups = w.group_size ? (size_t)row * (in / w.group_size) : 0;
    switch (w.type) {
    case WEIGHT_F32: { // PREFETCH_AHEAD's burst
        const float *w_row = w.f + (size_t)row * in;
        for (int i = 0; i < in; i += 16) __builtin_prefetch(w_row + i + PREFETCH_AHEAD / sizeof(float));
        return dot(w_row, x + (size_t)t * in, in);
    }
    case WEIGHT_Q8_0: return dot_q8(w.q + (size_t)row * in, w.scale + groups, xq, t, in, w.group_size);
    default: return dot_q4(w.q4 + (size_t)row * in / 2, w.d + groups, w.m ? w.m + groups : NULL, xq, t, in);
    }
}

// One int8 weight row against tokens t..t+3: each 64 weights are loaded and prepared once for the
// four tokens (prefill).
static void dot4_q8(const int8_t *w, const float *ws, const QuantizedRows *xq, int t, int n, int group_size, float out[4]) {
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
    int shift = q8_simd_shift(group_size);
    if (shift >= 0) {
        size_t lanes_per_row = lane_scales_per_row(n);
        const int8_t *x = xq->q + (size_t)t * n;
        const float *lanes = xq->lane_scale + (size_t)t * lanes_per_row;
        __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        for (int i = 0; i < n; i += 64) {
            __m512i bias;
            __m512 w_scale;
            __m512i wv = q8_weights(w, ws, i, n, shift, &bias, &w_scale);
            a0 = q8_chunk(a0, wv, bias, w_scale, x + i, lanes + i / 4);
            a1 = q8_chunk(a1, wv, bias, w_scale, x + n + i, lanes + lanes_per_row + i / 4);
            a2 = q8_chunk(a2, wv, bias, w_scale, x + 2 * n + i, lanes + 2 * lanes_per_row + i / 4);
            a3 = q8_chunk(a3, wv, bias, w_scale, x + 3 * n + i, lanes + 3 * lanes_per_row + i / 4);
        }
        out[0] = _mm512_reduce_add_ps(a0);
        out[1] = _mm512_reduce_add_ps(a1);
        out[2] = _mm512_reduce_add_ps(a2);
        out[3] = _mm512_reduce_add_ps(a3);
        return;
    }
#endif
    for (int k = 0; k < 4; k++) out[k] = dot_q8(w, ws, xq, t + k, n, group_size);
}

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
// One prepared row of 64 weights against four tokens' prepared activations (x + 128 and their lane
// scales), into four accumulators: the inner step of dot4x4_q8.
static inline void q8_row_x4(const int8_t *w, const float *ws, int i, int n, int shift, const __m512i x[4],
                             const __m512 x_scale[4], __m512 *a0, __m512 *a1, __m512 *a2, __m512 *a3) {
    __m512i bias;
    __m512 w_scale;
    __m512i wv = q8_weights(w, ws, i, n, shift, &bias, &w_scale);
    __m512i neg_bias = _mm512_sub_epi32(_mm512_setzero_si512(), bias);
    *a0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_dpbusd_epi32(neg_bias, x[0], wv)), _mm512_mul_ps(w_scale, x_scale[0]), *a0);
    *a1 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_dpbusd_epi32(neg_bias, x[1], wv)), _mm512_mul_ps(w_scale, x_scale[1]), *a1);
    *a2 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_dpbusd_epi32(neg_bias, x[2], wv)), _mm512_mul_ps(w_scale, x_scale[2]), *a2);
    *a3 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_dpbusd_epi32(neg_bias, x[3], wv)), _mm512_mul_ps(w_scale, x_scale[3]), *a3);
}
#endif

// Four int8 weight rows (row stride n) against tokens t..t+3: each token's activations are
// prepared once per 64 values for the four rows, so prefill streams them from L2 a quarter as often.
// Returns 0 where there is no such kernel (no AVX-512 VNNI, or groups not a power of two >= 32).
static int dot4x4_q8(const int8_t *w, const float *ws, const QuantizedRows *xq, int t, int n, int group_size,
                     float out[4][4]) {
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
    int shift = q8_simd_shift(group_size), groups = n / group_size;
    if (shift < 0) return 0;
    size_t lanes_per_row = lane_scales_per_row(n);
    __m512 r00 = _mm512_setzero_ps(), r01 = r00, r02 = r00, r03 = r00, r10 = r00, r11 = r00, r12 = r00, r13 = r00,
           r20 = r00, r21 = r00, r22 = r00, r23 = r00, r30 = r00, r31 = r00, r32 = r00, r33 = r00;
    for (int i = 0; i < n; i += 64) {
        __m512i x[4];
        __m512 x_scale[4];
        for (int k = 0; k < 4 && t == 0; k++) __builtin_prefetch(w + (size_t)k * n + i + PREFETCH_AHEAD); // PREFETCH_AHEAD
        for (int k = 0; k < 4; k++) {
            x[k] = _mm512_xor_si512(_mm512_loadu_si512(xq->q + (size_t)(t + k) * n + i), _mm512_set1_epi8((char)0x80));
            x_scale[k] = _mm512_loadu_ps(xq->lane_scale + (size_t)(t + k) * lanes_per_row + i / 4);
        }
        q8_row_x4(w, ws, i, n, shift, x, x_scale, &r00, &r01, &r02, &r03);
        q8_row_x4(w + n, ws + groups, i, n, shift, x, x_scale, &r10, &r11, &r12, &r13);
        q8_row_x4(w + 2 * (size_t)n, ws + 2 * groups, i, n, shift, x, x_scale, &r20, &r21, &r22, &r23);
        q8_row_x4(w + 3 * (size_t)n, ws + 3 * groups, i, n, shift, x, x_scale, &r30, &r31, &r32, &r33);
    }
    __m512 acc[16] = {r00, r01, r02, r03, r10, r11, r12, r13, r20, r21, r22, r23, r30, r31, r32, r33};
    store_sums4x4(acc, out);
    return 1;
#else
    (void)w, (void)ws, (void)xq, (void)t, (void)n, (void)group_size, (void)out;
    return 0;
#endif
}

// Four weight rows against four tokens: 16 accumulators, so every load feeds four FMAs and the
// block is compute-bound rather than bound by streaming activations from L2 (prefill). `first`:
// the first tokens of the block, which stream the rows from memory (see the 4x4 kernels' prefetch).
static void dot4x4(const float *w, const float *x, int n, int first, float out[4][4]) {
#if defined(__AVX512F__)
    // named accumulators: gcc spills an array of them to the stack on every iteration
    __m512 a00 = _mm512_setzero_ps(), a01 = a00, a02 = a00, a03 = a00, a10 = a00, a11 = a00, a12 = a00, a13 = a00,
           a20 = a00, a21 = a00, a22 = a00, a23 = a00, a30 = a00, a31 = a00, a32 = a00, a33 = a00;
    for (int i = 0; i < n; i += 16) {
        __mmask16 m = n - i >= 16 ? 0xFFFF : (__mmask16)((1u << (n - i)) - 1);
        for (int k = 0; k < 4 && first; k++) __builtin_prefetch(w + (size_t)k * n + i + PREFETCH_AHEAD / sizeof(float));
        __m512 x0 = _mm512_maskz_loadu_ps(m, x + i), x1 = _mm512_maskz_loadu_ps(m, x + n + i),
               x2 = _mm512_maskz_loadu_ps(m, x + 2 * n + i), x3 = _mm512_maskz_loadu_ps(m, x + 3 * n + i);
        __m512 w0 = _mm512_maskz_loadu_ps(m, w + i);
        a00 = _mm512_fmadd_ps(w0, x0, a00); a01 = _mm512_fmadd_ps(w0, x1, a01);
        a02 = _mm512_fmadd_ps(w0, x2, a02); a03 = _mm512_fmadd_ps(w0, x3, a03);
        __m512 w1 = _mm512_maskz_loadu_ps(m, w + n + i);
        a10 = _mm512_fmadd_ps(w1, x0, a10); a11 = _mm512_fmadd_ps(w1, x1, a11);
        a12 = _mm512_fmadd_ps(w1, x2, a12); a13 = _mm512_fmadd_ps(w1, x3, a13);
        __m512 w2 = _mm512_maskz_loadu_ps(m, w + 2 * n + i);
        a20 = _mm512_fmadd_ps(w2, x0, a20); a21 = _mm512_fmadd_ps(w2, x1, a21);
        a22 = _mm512_fmadd_ps(w2, x2, a22); a23 = _mm512_fmadd_ps(w2, x3, a23);
        __m512 w3 = _mm512_maskz_loadu_ps(m, w + 3 * n + i);
        a30 = _mm512_fmadd_ps(w3, x0, a30); a31 = _mm512_fmadd_ps(w3, x1, a31);
        a32 = _mm512_fmadd_ps(w3, x2, a32); a33 = _mm512_fmadd_ps(w3, x3, a33);
    }
    __m512 acc[16] = {a00, a01, a02, a03, a10, a11, a12, a13, a20, a21, a22, a23, a30, a31, a32, a33};
    store_sums4x4(acc, out);
#else
    (void)first;
    for (int r = 0; r < 4; r++) dot4(w + (size_t)r * n, x, n, n, out[r]);
#endif
}

static void store(const Projection *p, int t, int i, float value) {
    float *o = p->out + (size_t)t * p->rows + i;
    *o = value + (p->accumulate ? *o : 0.0f);
}

// Row i of W against tokens first..n-1: the row is loaded once and stays in L1 across the tokens.
static void matmul_row(const Projection *p, int i, const float *x, const QuantizedRows *xq, int first, int n, int in) {
    Matrix w = p->w;
    // 4-token kernels: fp32, and int8 on AVX-512 (q4 rows left over from 4-row blocks go one token at a time)
    int four = w.type == WEIGHT_F32 || (w.type == WEIGHT_Q8_0 && q8_simd_shift(w.group_size) >= 0);
    float r[4];
    for (int t = first; t < n;) {
        int k = four && n - t >= 4 ? 4 : 1;
        if (k == 1) r[0] = dot_row(w, i, x, xq, t, in);
        else if (w.type == WEIGHT_F32) dot4(w.f + (size_t)i * in, x + (size_t)t * in, in, in, r);
        else dot4_q8(w.q + (size_t)i * in, w.scale + (size_t)i * (in / w.group_size), xq, t, in, w.group_size, r);
        for (int j = 0; j < k; j++, t++) store(p, t, i, r[j]);
    }
}

// Rows i..i+count-1 (count <= 4) of W against all n tokens, in blocks of 4 rows x 4 tokens where
// a kernel exists for them.
static void matmul_block(const Projection *p, int i, int count, const float *x, const QuantizedRows *xq, int n, int in) {
    Matrix w = p->w;
    int t = 0;
    size_t groups = w.group_size ? (size_t)i * (in / w.group_size) : 0;
    for (float r[4][4]; count == 4 && n - t >= 4; t += 4) {
        int done = 1;
        switch (w.type) {
        case WEIGHT_F32: dot4x4(w.f + (size_t)i * in, x + (size_t)t * in, in, t == 0, r); break;
        case WEIGHT_Q8_0: done = dot4x4_q8(w.q + (size_t)i * in, w.scale + groups, xq, t, in, w.group_size, r); break;
        default: done = dot4x4_q4(w.q4 + (size_t)i * in / 2, w.d + groups, w.m ? w.m + groups : NULL, xq, t, in, r);
        }
        if (!done) break;
        for (int a = 0; a < 4; a++)
            for (int b = 0; b < 4; b++) store(p, t + b, i + a, r[a][b]);
    }
    for (int a = 0; a < count; a++) matmul_row(p, i + a, x, xq, t, n, in);
}

// Rotates output rows i..i+count-1 (whole pairs: blocks and heads start on even rows) of every
// token by its position: pair (2j, 2j+1) of a head turns by position * theta^(-2j/head_dim).
static void rope_rows(const Projection *p, int i, int count, int n) {
    const Rope *rope = p->rope;
    for (int t = 0; t < n; t++) {
        float *row = p->out + (size_t)t * p->rows;
        const float *cos_t = rope->cos + (size_t)t * rope->half, *sin_t = rope->sin + (size_t)t * rope->half;
        for (int r = i; r < i + count; r += 2) {
            int j = (r / 2) % rope->half;
            float a = row[r], b = row[r + 1];
            row[r] = a * cos_t[j] - b * sin_t[j];
            row[r + 1] = a * sin_t[j] + b * cos_t[j];
        }
    }
}

// Matmuls that share their input (q, k, v) as one loop over all their rows in blocks of 4, so the
// threads split the work once and meet at one barrier.
static void matmuls(const Projection *p, int count, const float *x, const QuantizedRows *xq, int n, int in) {
    int blocks = 0;
    for (int j = 0; j < count; j++) blocks += (p[j].rows + 3) / 4;
#pragma omp for schedule(static)
    for (int b = 0; b < blocks; b++) {
        int j = 0, i = 4 * b;
        while (i >= 4 * ((p[j].rows + 3) / 4)) i -= 4 * ((p[j++].rows + 3) / 4);
        int count_rows = p[j].rows - i < 4 ? p[j].rows - i : 4;
        matmul_block(&p[j], i, count_rows, x, xq, n, in);
        if (p[j].rope) rope_rows(&p[j], i, count_rows, n);
    }
}

static void matmul(Projection p, const float *x, const QuantizedRows *xq, int n, int in) { matmuls(&p, 1, x, xq, n, in); }

static void rmsnorm(float *out, const float *x, const float *weight, int n, float eps) {
    float ss = dot(x, x, n) / n;
    float scale = 1.0f / sqrtf(ss + eps);
    for (int i = 0; i < n; i++) out[i] = x[i] * scale * weight[i];
}

#if defined(__AVX512F__)
// e^x in 16 lanes: x = k ln2 + r with |r| <= ln2/2, e^r by its degree-6 Taylor polynomial (relative
// error ~1e-7), times 2^k by vscalefps (which also takes care of underflow to 0).
static __m512 exp16(__m512 x) {
    __m512 k = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(k, _mm512_set1_ps(0.693145751953125f), x); // ln2 split in two for precision
    r = _mm512_fnmadd_ps(k, _mm512_set1_ps(1.428606765330187e-06f), r);
    __m512 p = _mm512_set1_ps(1.0f / 720);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, k);
}
#endif

// x[i] = e^(x[i] - max) in place; returns their sum and, in *max_out, the max. The pieces of a
// softmax that attention split over several threads merges afterwards.
static float exp_shifted(float *x, int n, float *max_out) {
    float max = x[0], sum = 0;
    int i = 0;
#if defined(__AVX512F__)
    __m512 vmax = _mm512_set1_ps(max); // (a NaN in x is passed over, as the scalar loop passes it; NaN sums stay NaN)
    for (int j = 0; j < n; j += 16) {
        __mmask16 m = n - j >= 16 ? 0xFFFF : (__mmask16)((1u << (n - j)) - 1);
        vmax = _mm512_mask_max_ps(vmax, m, _mm512_maskz_loadu_ps(m, x + j), vmax);
    }
    max = _mm512_reduce_max_ps(vmax);
    __m512 vsum = _mm512_setzero_ps();
    vmax = _mm512_set1_ps(max);
    for (; i < n; i += 16) {
        __mmask16 m = n - i >= 16 ? 0xFFFF : (__mmask16)((1u << (n - i)) - 1);
        __m512 e = exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, x + i), vmax));
        _mm512_mask_storeu_ps(x + i, m, e);
        vsum = _mm512_mask_add_ps(vsum, m, vsum, e);
    }
    sum = _mm512_reduce_add_ps(vsum);
#else
    for (int j = 1; j < n; j++) if (x[j] > max) max = x[j];
#endif
    for (; i < n; i++) sum += (x[i] = expf(x[i] - max));
    *max_out = max;
    return sum;
}

static void softmax(float *x, int n) {
    float max, inv = 1.0f / exp_shifted(x, n, &max);
    for (int i = 0; i < n; i++) x[i] *= inv;
}

// Row `token` of the embedding table, dequantized.
static void embed(float *out, Matrix table, int token, int dim) {
    Matrix row = matrix_at(table, token, dim);
    switch (row.type) {
    case WEIGHT_F32: memcpy(out, row.f, dim * sizeof(float)); break;
    case WEIGHT_Q8_0: for (int i = 0; i < dim; i++) out[i] = row.q[i] * row.scale[i / row.group_size]; break;
    default:
        for (int b = 0; b < dim / Q4_BLOCK; b++) {
            float d = f16_to_f32(row.d[b]), offset = row.m ? f16_to_f32(row.m[b]) : -8.0f * d;
            for (int j = 0; j < Q4_BLOCK / 2; j++) {
                uint8_t byte = row.q4[b * (Q4_BLOCK / 2) + j];
                out[b * Q4_BLOCK + j] = (byte & 15) * d + offset;
                out[b * Q4_BLOCK + j + Q4_BLOCK / 2] = (byte >> 4) * d + offset;
            }
        }
    }
}

// Attention reads a run of cache rows in order at a rate near the memory's bandwidth: the kernels
// ask for the rows this many bytes ahead themselves, far enough to cover the memory's latency (q8_0
// rows of 64 values 60 rows ahead, f16 32, f32 16). Against 16 rows for every type, q8_0 decode at
// 2048 positions went from 1.25x position 0's time to 1.22x.
#define PREFETCH_BYTES 4096
#define CACHE_LINE 64 // bytes the memory moves at once

// Asks for rows first..first+count-1 of a run of n cache rows that lie end to end, `stride` bytes
// apart from base (a kv head's rows in a run do), PREFETCH_BYTES ahead: each line that begins there,
// once. The kernels ask a row at a time as they read it, but int8 keys a tile at a time (one call
// for the 17 lines of 16 q8_0 rows costs less than 16 in their busy loop); a burst of 16 f32 rows
// (64 lines) was slower. q8_0 rows of 64 values are 68 bytes: asking for every line a row touched
// doubled the requests, and asking once a line took q8_0 decode at 2048 positions from 1.22-1.23x
// position 0's time to 1.20-1.21x.
static void prefetch_ahead(const uint8_t *base, size_t stride, int first, int count, int n) {
    uintptr_t at = (uintptr_t)base + first * stride + PREFETCH_BYTES, end = (uintptr_t)base + n * stride;
    uintptr_t to = at + count * stride < end ? at + count * stride : end;
    for (uintptr_t line = (at + CACHE_LINE - 1) / CACHE_LINE * CACHE_LINE; line < to; line += CACHE_LINE)
        __builtin_prefetch((const void *)line);
}

// out += a * v over n values.
static void axpy(float *restrict out, float a, const float *restrict v, int n) {
    for (int d = 0; d < n; d++) out[d] += a * v[d];
}

// out += sum over i < len of weights[i] * rows[i * stride .. + n]: values weighted by attention (a
// cache's f32 rows, or a tile of rows widened to f32; either way end to end, as prefetch_ahead asks).
static void weighted_sum(float *out, const float *weights, const float *rows, size_t stride, int len, int n) {
    int d = 0;
#if defined(__AVX512F__)
    for (; d + 64 <= n; d += 64) { // 64 dims in 4 registers, accumulated over every row
        __m512 a0 = _mm512_loadu_ps(out + d), a1 = _mm512_loadu_ps(out + d + 16), a2 = _mm512_loadu_ps(out + d + 32),
               a3 = _mm512_loadu_ps(out + d + 48);
        const float *v = rows + d;
        for (int i = 0; i < len; i++, v += stride) {
            if (d == 0) prefetch_ahead((const uint8_t *)rows, stride * sizeof(float), i, 1, len);
            __m512 w = _mm512_set1_ps(weights[i]);
            a0 = _mm512_fmadd_ps(w, _mm512_loadu_ps(v), a0);
            a1 = _mm512_fmadd_ps(w, _mm512_loadu_ps(v + 16), a1);
            a2 = _mm512_fmadd_ps(w, _mm512_loadu_ps(v + 32), a2);
            a3 = _mm512_fmadd_ps(w, _mm512_loadu_ps(v + 48), a3);
        }
        _mm512_storeu_ps(out + d, a0);
        _mm512_storeu_ps(out + d + 16, a1);
        _mm512_storeu_ps(out + d + 32, a2);
        _mm512_storeu_ps(out + d + 48, a3);
    }
#endif
    // the rest (all of it without AVX-512), row by row
    for (int i = 0; i < len && d < n; i++) axpy(out + d, weights[i], rows + (size_t)i * stride + d, n - d);
}

// ----------------------------------------------------------------------------
// The KV cache: the keys and values of every layer at every position a sequence has run, kept in
// a pool of blocks that many sequences share (PagedAttention).
//
// Picture two arrays (n_layers, n_kv_heads, slots, head_dim), one of keys and one of values: row
// (layer, head, slot) holds kv head `head`'s head_dim values of one position, stored in the cache's
// type. The slots are cut into blocks of block_size: block b is slots b * block_size.. in every
// (layer, kv head) plane. A sequence's block table maps its positions to slots: position pos lies
// in block table[pos / block_size], row pos % block_size. One sequence whose table is filled in
// order (block i at logical block i) is the textbook (layer, head, position) cache, slot = position:
// that is what a single Model and the CLI run. Head-major, so that the rows one kv head's attention
// reads lie one after another and stream from memory at full speed (with (layer, pos, kv_dim) rows
// a head reads a slice every kv_dim values, which measured ~2x slower for f16 at 2048 positions);
// runs of consecutive blocks in a table are read as one run.
//
//   keys plane (layer l, kv head h):  | block 0 | block 1 | block 2 | block 3 | ...   (block_size rows each)
//   sequence A's table: [2, 0]   positions 0..15 in block 2, 16..31 in block 0
//   sequence B's table: [2, 3]   shares block 2 with A (a common prefix), refs[2] = 2
//
// Blocks are counted by references (the tables holding them); a write into a block another table
// also holds copies it first (copy-on-write). Full blocks are registered in a prefix cache under
// (the registration of the block before them, their tokens), so a new sequence whose tokens start
// the same way takes them instead of recomputing; unreferenced registered blocks stay there until
// the pool needs them, least recently released first.
//
// The cache is an object: one writer (cache_write stores a block's rows), one reader (cache_run
// hands out runs of consecutive positions) and the typed run kernels that read rows (kv_dot,
// kv_axpy). Nothing outside this section knows the layout or the element type.

enum { CACHE_F32 = 0, CACHE_F16 = 1, CACHE_BF16 = 2, CACHE_Q8_0 = 3, CACHE_Q4_0 = 4, CACHE_IQ4_NL = 5, N_CACHE_TYPES = 6 };
#define CACHE_GROUP 32 // values per fp16 scale in q8_0, q4_0 and iq4_nl blocks

// A row is stored in blocks of `values` values in `bytes` bytes. q8_0: an fp16 scale d, then 32
// int8 q, x = q * d. q4_0: an fp16 scale d, then 16 bytes holding value j in the low nibble of
// byte j and value j + 16 in its high nibble, x = (q - 8) * d. iq4_nl: q4_0's bytes, x =
// IQ4_NL_LEVELS[q] * d (GGML's blocks, so the numbers compare and -ctk names the same storage).
static const struct { const char *name; int values, bytes; } CACHE_TYPES[N_CACHE_TYPES] = {
    [CACHE_F32] = {"f32", 1, 4},
    [CACHE_F16] = {"f16", 1, 2},
    [CACHE_BF16] = {"bf16", 1, 2},
    [CACHE_Q8_0] = {"q8_0", CACHE_GROUP, 2 + CACHE_GROUP},
    [CACHE_Q4_0] = {"q4_0", CACHE_GROUP, 2 + CACHE_GROUP / 2},
    [CACHE_IQ4_NL] = {"iq4_nl", CACHE_GROUP, 2 + CACHE_GROUP / 2},
};

// iq4_nl's 16 levels (GGML's kvalues_iq4nl), denser near zero. They fit int8, so the int8 kernels
// read iq4_nl exactly as they read q8_0.
static const int8_t IQ4_NL_LEVELS[16] = {-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113};
// The scales store_iq4_nl tries for a block, as peak / t: the peak on or near either end level.
static const float IQ4_NL_TRIALS[] = {-141, -134, -127, -120, -113, -106, 127, 120, 113, 106};

// An iq4_nl cache also centers its keys and keeps its first position apart: every key is stored
// less its kv head's mean key (the model's key_mean; none: nothing taken), which leaves attention
// unchanged (a query's scores all move by q . mean, and softmax ignores that), and position 0, the
// attention sink most heads look at, is stored as CACHE_SINK_TYPE in a slot of its own.
#define CACHE_SINK_TYPE CACHE_Q8_0

static int cache_4bit(int type) { return type == CACHE_Q4_0 || type == CACHE_IQ4_NL; }
static int cache_has_sink(int type) { return type == CACHE_IQ4_NL; }
// Types stored in blocks of int8 values (4-bit ones unpacked to int8) and a scale: read by int8 kernels.
static int cache_int8(int type) { return type == CACHE_Q8_0 || cache_4bit(type); }

// What a sequence's cache stores: element types of keys and values, and whether each head's keys
// (and queries) and values (and attention output) are turned by an orthonormal Hadamard rotation
// first, which spreads outlier channels before quantization and leaves attention unchanged.
typedef struct {
    int type_k, type_v;  // CACHE_*
    int rotate;
} CacheSpec;

#define BLOCK_SIZE 16 // positions per block, unless asked otherwise (vLLM's default)
#define DEFAULT_SINKS 4 // first positions a window keeps unless told otherwise (StreamingLLM's)

// The pool: every block's rows, and the books of who holds which block.
typedef struct {
    CacheSpec spec;
    int n_layers, n_kv_heads, kv_dim, head_dim;
    int block_size;                 // positions per block
    int n_blocks;                   // blocks in the pool
    int slots;                      // rows of each (layer, kv head) plane: n_blocks * block_size, or fewer when
                                    // the last block is cut short (a single sequence's pool sized to its context)
    size_t head_row_k, head_row_v;  // bytes of one head's keys, values at one position
    uint8_t *keys, *values;         // (n_layers, n_kv_heads, slots, head_row_k / head_row_v bytes)
    size_t head_row_sink;           // bytes of one head's row as CACHE_SINK_TYPE
    int sink_blocks;                // blocks that can be a sequence's first (1 in a pool whose blocks stay in order)
    uint8_t *sink_keys, *sink_values; // (n_layers, n_kv_heads, sink_blocks, head_row_sink bytes): position 0 of the
                                      // sequence whose first block is block b, when the keys / values have a
                                      // sink (cache_has_sink), else NULL
    uint8_t *sink_used;             // (n_blocks) row 0 of the block lies in its sink slot: it holds a sequence's position 0
    const float *key_mean;          // (n_layers, n_kv_heads, head_dim) taken from iq4_nl keys, else NULL
    // the books
    int *refs;                      // (n_blocks) tables holding each block
    int *free_list, n_free;         // (n_blocks) a stack of unreferenced blocks holding nothing worth keeping
    int *free_at;                   // (n_blocks) where each block lies in free_list, or -1
    int prefix_cache;               // whether full blocks are registered for reuse
    uint64_t *serial;               // (n_blocks) a registered block's registration number (unique, never reused), else 0
    uint64_t *parent;               // (n_blocks) the serial of the block before it in its sequence (0: it was first)
    int *block_tokens;              // (n_blocks, block_size) a registered block's tokens
    int *bucket, n_buckets;         // (n_buckets, a power of two) the first registered block of each hash chain, or -1
    int *next_in_bucket;            // (n_blocks) the next registered block with the same hash, or -1
    int *lru_prev, *lru_next;       // (n_blocks) unreferenced registered blocks, a list from the least recently
    int lru_first, lru_last, n_cached; // released (the first to evict) to the last; -1 ends it
    uint64_t next_serial;           // the next registration's number
    long long prefix_hits;          // positions sequences took from the prefix cache
    int poison;                     // refill blocks with NaN as they are freed (tests: stray reads show)
} KVPool;

// A sequence's view of the pool: its block table.
typedef struct {
    KVPool *pool;
    int *table;                     // (max_blocks) the pool block holding each block_size positions
    int n_table;                    // blocks in the table
    int max_blocks;                 // room in the table: the sequence's capacity / block_size, rounded up
    int capacity;                   // positions the sequence may hold
    int *tokens;                    // (capacity) the token at each row (prefix blocks are named by them)
    int registered;                 // leading blocks of the table registered in the prefix cache
    // a window (StreamingLLM): rows 0..sinks-1 hold the first positions, rows sink_rows.. the last
    // `recent` positions; a position's place inside the cache (what RoPE turns it by) is its row
    // less the padding between the two
    int window;                     // positions the window keeps, a multiple of block_size (0: no window, row = position)
    int sinks;                      // first positions kept while the window moves
    int sink_rows;                  // rows before the window's: sinks rounded up to whole blocks
    int recent;                     // positions in the window now
    // heavy hitters (H2O): at most `h2o_budget` rows, in no order, each a position and the attention
    // it has drawn (see cache_evict); RoPE turns each position by the position itself
    int h2o_budget;                 // rows kept (0: no H2O)
    int h2o_recent;                 // the last positions never evicted
    int h2o_rows;                   // rows held
    int h2o_context;                // positions it can run: the model's context
    int *h2o_position;              // (capacity) each row's position
    double *h2o_score;              // (capacity) each row's accumulated attention
} KVCache;

// Consecutive positions whose rows lie a fixed stride apart: what attention reads in one go.
typedef struct {
    int type_k, type_v;
    const uint8_t *keys, *values;   // kv head 0's row at the run's first position
    size_t key_stride, value_stride; // bytes from one position's row to the next
    size_t key_head, value_head;    // bytes from one kv head's rows to the next head's
    int n;                          // positions in the run
} KVRun;

static int cache_type_by_name(const char *name) {
    for (int t = 0; t < N_CACHE_TYPES; t++)
        if (!strcmp(name, CACHE_TYPES[t].name)) return t;
    return -1;
}

static size_t row_bytes(int type, int n) { return (size_t)n / CACHE_TYPES[type].values * CACHE_TYPES[type].bytes; }

// IEEE half <-> float, rounding to nearest even (the FP16 library's branch-free method): the
// reference and the F16C instructions round the same way, so every build stores the same bits.
static uint32_t float_bits(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }
static float bits_float(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }

static uint16_t f32_to_f16(float f) {
    float base = (fabsf(f) * 0x1.0p+112f) * 0x1.0p-110f; // rounds at half's precision, saturates to inf
    uint32_t w = float_bits(f), shl1_w = w + w, sign = w & 0x80000000u, bias = shl1_w & 0xFF000000u;
    if (bias < 0x71000000u) bias = 0x71000000u;
    base = bits_float((bias >> 1) + 0x07800000u) + base;
    uint32_t bits = float_bits(base), nonsign = ((bits >> 13) & 0x7C00u) + (bits & 0x0FFFu);
    return (uint16_t)((sign >> 16) | (shl1_w > 0xFF000000u ? 0x7E00u : nonsign));
}

static float f16_to_f32(uint16_t h) {
    uint32_t w = (uint32_t)h << 16, sign = w & 0x80000000u, two_w = w + w;
    float normalized = bits_float((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
    float denormalized = bits_float((two_w >> 17) | (126u << 23)) - 0.5f;
    return bits_float(sign | float_bits(two_w < (1u << 27) ? denormalized : normalized));
}

static uint16_t f32_to_bf16(float f) { // round to nearest even, as torch does
    uint32_t u = float_bits(f);
    if ((u & 0x7FFFFFFFu) > 0x7F800000u) return (uint16_t)(u >> 16 | 0x40); // NaN stays NaN
    return (uint16_t)((u + 0x7FFFu + (u >> 16 & 1)) >> 16);
}

static float bf16_to_f32(uint16_t h) { return bits_float((uint32_t)h << 16); }

#define F16_NAN 0x7E00

// A block holding NaN or Inf stores as all NaN (a NaN scale): broken activations must show.
static int store_nonfinite(uint8_t *b, const float *x, int bytes) {
    for (int j = 0; j < CACHE_GROUP; j++)
        if (!isfinite(x[j])) {
            memset(b, 0, bytes);
            uint16_t nan = F16_NAN;
            memcpy(b, &nan, 2);
            return 1;
        }
    return 0;
}

static void store_q8_0(uint8_t *b, const float *x) {
    if (store_nonfinite(b, x, CACHE_TYPES[CACHE_Q8_0].bytes)) return;
    float amax = 0;
    for (int j = 0; j < CACHE_GROUP; j++) amax = fmaxf(amax, fabsf(x[j]));
    uint16_t d16 = f32_to_f16(amax / 127.0f);
    float d = f16_to_f32(d16), inv = d > 0 ? 1.0f / d : 0.0f;
    memcpy(b, &d16, 2);
    for (int j = 0; j < CACHE_GROUP; j++) {
        float q = rintf(x[j] * inv); // nearest even
        b[2 + j] = (uint8_t)(int8_t)(q > 127 ? 127 : q < -127 ? -127 : q);
    }
}

// x * y rounded to float32 by itself, never fused with a following add into an fma: as the reference rounds it.
static float product(float x, float y) {
    volatile float p = x * y;
    return p;
}

// The midpoint between iq4_nl levels k and k + 1.
static float iq4_nl_midpoint(int k) { return 0.5f * (float)(IQ4_NL_LEVELS[k] + IQ4_NL_LEVELS[k + 1]); }

// The sum of a block's 32 terms s (AVX-512: in two registers, values 0-15 and 16-31) in a fixed
// order, halving: s[i] + s[i + w] for w = 16, 8, 4, 2, 1, as the reference sums them.
#if defined(__AVX512F__)
static inline float block_sum(__m512 lo, __m512 hi) {
    __m512 s16 = _mm512_add_ps(lo, hi);
    __m256 s8 = _mm256_add_ps(_mm512_castps512_ps256(s16), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(s16), 1)));
    __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps(s8, 1));
    __m128 s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
    return _mm_cvtss_f32(_mm_add_ss(s2, _mm_shuffle_ps(s2, s2, 1)));
}
#else
static float block_sum(float *s) {
    for (int w = CACHE_GROUP / 2; w > 0; w /= 2)
        for (int i = 0; i < w; i++) s[i] += s[i + w];
    return s[0];
}
#endif

// Each value's nearest iq4_nl level at scale d into q: how many midpoints between levels lie below
// x / d (a tie goes to the lower level). Returns sum (x - d L[q])^2 and sets *xl = sum x L[q], each
// product rounded by itself (never fused into an fma) and summed in block_sum's order.
static float iq4_nl_assign(const float *x, float d, uint8_t *q, float *xl) {
#if defined(__AVX512F__)
    const int round = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC; // the _round products are never fused
    __m512 vd = _mm512_set1_ps(d), levels = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)IQ4_NL_LEVELS)));
    __m512 e2[2], p[2];
    for (int h = 0; h < 2; h++) {
        __m512 xv = _mm512_loadu_ps(x + 16 * h), v = _mm512_div_ps(xv, vd);
        __m512i level = _mm512_setzero_si512();
        for (int k = 0; k < 15; k++)
            level = _mm512_mask_add_epi32(level, _mm512_cmp_ps_mask(v, _mm512_set1_ps(iq4_nl_midpoint(k)), _CMP_GT_OQ), level,
                                          _mm512_set1_epi32(1));
        _mm_storeu_si128((__m128i *)(q + 16 * h), _mm512_cvtepi32_epi8(level));
        __m512 l = _mm512_permutexvar_ps(level, levels), e = _mm512_sub_ps(xv, _mm512_mul_round_ps(vd, l, round));
        e2[h] = _mm512_mul_round_ps(e, e, round);
        p[h] = _mm512_mul_round_ps(xv, l, round);
    }
    *xl = block_sum(p[0], p[1]);
    return block_sum(e2[0], e2[1]);
#else
    float e2[CACHE_GROUP], p[CACHE_GROUP];
    for (int j = 0; j < CACHE_GROUP; j++) {
        float v = x[j] / d;
        int level = 0;
        for (int k = 0; k < 15; k++) level += v > iq4_nl_midpoint(k);
        q[j] = (uint8_t)level;
        float e = x[j] - product(d, IQ4_NL_LEVELS[level]);
        e2[j] = product(e, e);
        p[j] = product(x[j], IQ4_NL_LEVELS[level]);
    }
    *xl = block_sum(p);
    return block_sum(e2);
#endif
}

// An iq4_nl block: for each trial scale d = peak / t (peak: the first value of largest magnitude),
// the nearest levels, then d refit by least squares to those levels and the levels chosen again;
// the scale with the smallest squared error wins (the first of equals). No usable scale (an
// all-zero block): level 1 times peak / -127.
static void store_iq4_nl(uint8_t *b, const float *x) {
    if (store_nonfinite(b, x, CACHE_TYPES[CACHE_IQ4_NL].bytes)) return;
    float peak = x[0];
    for (int j = 1; j < CACHE_GROUP; j++) if (fabsf(x[j]) > fabsf(peak)) peak = x[j];
    uint16_t best_d = f32_to_f16(peak / -127.0f);
    uint8_t best[CACHE_GROUP], q[CACHE_GROUP];
    memset(best, 8, sizeof best); // level 1
    float best_error = 0;
    int found = 0;
    for (size_t i = 0; i < sizeof IQ4_NL_TRIALS / sizeof IQ4_NL_TRIALS[0]; i++) {
        uint16_t d16 = f32_to_f16(peak / IQ4_NL_TRIALS[i]);
        float d = f16_to_f32(d16);
        if (d == 0 || !isfinite(d)) continue;
        float xl, error = iq4_nl_assign(x, d, q, &xl);
        int ll = 0; // exact: at most 32 x 127^2
        for (int j = 0; j < CACHE_GROUP; j++) ll += IQ4_NL_LEVELS[q[j]] * IQ4_NL_LEVELS[q[j]];
        uint16_t refit16 = f32_to_f16(xl / (float)ll);
        float refit = f16_to_f32(refit16);
        if (refit != 0 && isfinite(refit)) d16 = refit16, error = iq4_nl_assign(x, refit, q, &xl);
        if (!found || error < best_error) {
            found = 1;
            best_error = error;
            best_d = d16;
            memcpy(best, q, sizeof q);
        }
    }
    memcpy(b, &best_d, 2);
    for (int j = 0; j < CACHE_GROUP / 2; j++) b[2 + j] = (uint8_t)(best[j] | best[j + CACHE_GROUP / 2] << 4);
}

static void store_q4_0(uint8_t *b, const float *x) {
    if (store_nonfinite(b, x, CACHE_TYPES[CACHE_Q4_0].bytes)) return;
    float max = x[0]; // the first value of largest magnitude, with its sign: it becomes -8 * d
    for (int j = 1; j < CACHE_GROUP; j++) if (fabsf(x[j]) > fabsf(max)) max = x[j];
    uint16_t d16 = f32_to_f16(max / -8.0f);
    float d = f16_to_f32(d16), inv = d != 0 ? 1.0f / d : 0.0f;
    memcpy(b, &d16, 2);
    uint8_t q[CACHE_GROUP];
    for (int j = 0; j < CACHE_GROUP; j++) {
        float v = floorf(product(x[j], inv) + 8.5f);
        q[j] = (uint8_t)(v < 0 ? 0 : v > 15 ? 15 : v);
    }
    for (int j = 0; j < CACHE_GROUP / 2; j++) b[2 + j] = (uint8_t)(q[j] | q[j + CACHE_GROUP / 2] << 4);
}

// n values of x stored as `type` at dst.
static void store_row(int type, uint8_t *dst, const float *x, int n) {
    switch (type) {
    case CACHE_F32: memcpy(dst, x, n * sizeof(float)); break;
    case CACHE_F16: for (int i = 0; i < n; i++) { uint16_t h = f32_to_f16(x[i]); memcpy(dst + 2 * i, &h, 2); } break;
    case CACHE_BF16: for (int i = 0; i < n; i++) { uint16_t h = f32_to_bf16(x[i]); memcpy(dst + 2 * i, &h, 2); } break;
    case CACHE_Q8_0: for (int i = 0; i < n; i += CACHE_GROUP) store_q8_0(dst + row_bytes(type, i), x + i); break;
    case CACHE_Q4_0: for (int i = 0; i < n; i += CACHE_GROUP) store_q4_0(dst + row_bytes(type, i), x + i); break;
    case CACHE_IQ4_NL: for (int i = 0; i < n; i += CACHE_GROUP) store_iq4_nl(dst + row_bytes(type, i), x + i); break;
    }
}

// n copies of `fill` stored as `type` (as near as the type gets: a block is the scale fill times
// one step, so NaN fills every value with NaN).
static void fill_row(int type, uint8_t *dst, float fill, int n) {
    if (cache_int8(type)) {
        uint16_t d16 = f32_to_f16(fill);
        int one = type == CACHE_Q8_0 ? 1 : type == CACHE_Q4_0 ? 0x99 : 0x88; // q = 1; 9 - 8 = 1; level 8 = 1
        for (int i = 0; i < n; i += CACHE_GROUP, dst += CACHE_TYPES[type].bytes) {
            memcpy(dst, &d16, 2);
            memset(dst + 2, one, CACHE_TYPES[type].bytes - 2);
        }
        return;
    }
    for (int i = 0; i < n; i++) store_row(type, dst + row_bytes(type, i), &fill, 1); // no row-sized buffer: kv_dim can be large
}

// The fp16 scale at the start of a q8_0/q4_0/iq4_nl block.
static float block_scale(const uint8_t *block) {
    uint16_t d;
    memcpy(&d, block, 2);
    return f16_to_f32(d);
}

// Value j of a q8_0/q4_0/iq4_nl block as an int8 (x = it times the block's scale).
static int block_value(int type, const uint8_t *block, int j) {
    if (type == CACHE_Q8_0) return (int8_t)block[2 + j];
    int q = j < CACHE_GROUP / 2 ? block[2 + j] & 15 : block[2 + j - CACHE_GROUP / 2] >> 4;
    return type == CACHE_Q4_0 ? q - 8 : IQ4_NL_LEVELS[q];
}

#if defined(__AVX512F__)
// The int8 values of a q4_0/iq4_nl block's 16 bytes of nibbles: values 0-15 (the low nibbles) into
// lo, 16-31 into hi.
static inline void nibble_values(int type, __m128i bytes, __m128i *lo, __m128i *hi) {
    __m128i nibble = _mm_set1_epi8(15);
    *lo = _mm_and_si128(bytes, nibble);
    *hi = _mm_and_si128(_mm_srli_epi16(bytes, 4), nibble);
    if (type == CACHE_Q4_0) {
        *lo = _mm_sub_epi8(*lo, _mm_set1_epi8(8));
        *hi = _mm_sub_epi8(*hi, _mm_set1_epi8(8));
    } else {
        __m128i levels = _mm_loadu_si128((const __m128i *)IQ4_NL_LEVELS);
        *lo = _mm_shuffle_epi8(levels, *lo);
        *hi = _mm_shuffle_epi8(levels, *hi);
    }
}
#endif

// n values stored as `type` at src, as float32 into out: every build gives the same bits.
static void load_row(int type, const uint8_t *src, float *out, int n) {
    int i = 0;
    switch (type) {
    case CACHE_F32: memcpy(out, src, n * sizeof(float)); return;
    case CACHE_F16:
#if defined(__AVX512F__)
        for (; i + 16 <= n; i += 16) _mm512_storeu_ps(out + i, _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(src + 2 * i))));
#endif
        for (uint16_t h; i < n; i++) memcpy(&h, src + 2 * i, 2), out[i] = f16_to_f32(h);
        return;
    case CACHE_BF16:
#if defined(__AVX512F__)
        for (; i + 16 <= n; i += 16) {
            __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(src + 2 * i)));
            _mm512_storeu_ps(out + i, _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16)));
        }
#endif
        for (uint16_t h; i < n; i++) memcpy(&h, src + 2 * i, 2), out[i] = bf16_to_f32(h);
        return;
    case CACHE_Q8_0:
    case CACHE_Q4_0:
    case CACHE_IQ4_NL:
        for (; i < n; i += CACHE_GROUP, src += CACHE_TYPES[type].bytes) {
            float d = block_scale(src);
#if defined(__AVX512F__)
            __m512 vd = _mm512_set1_ps(d);
            __m128i lo = _mm_loadu_si128((const __m128i *)(src + 2)), hi;
            if (type == CACHE_Q8_0) hi = _mm_loadu_si128((const __m128i *)(src + 18));
            else nibble_values(type, lo, &lo, &hi);
            _mm512_storeu_ps(out + i, _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(lo)), vd));
            _mm512_storeu_ps(out + i + 16, _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(hi)), vd));
#else
            for (int j = 0; j < CACHE_GROUP; j++) out[i + j] = d * (float)block_value(type, src, j);
#endif
        }
        return;
    }
}

// x (n, a power of two) turned by the orthonormal Hadamard matrix H / sqrt(n), in place. H is
// symmetric and orthonormal, so the same call undoes it. The butterflies run in this fixed order in
// float32, as the reference runs them.
static void hadamard(float *x, int n) {
    for (int h = 1; h < n; h *= 2)
        for (int i = 0; i < n; i += 2 * h)
            for (int j = i; j < i + h; j++) {
                float a = x[j], b = x[j + h];
                x[j] = a + b;
                x[j + h] = a - b;
            }
    float scale = 1.0f / sqrtf((float)n);
    for (int i = 0; i < n; i++) x[i] *= scale;
}

// A spec for heads of head_dim values; rotate < 0 picks the default: rotate when a type is 4-bit,
// where it matters most, and head_dim is a power of two (the rotation's size), as llama.cpp does.
static CacheSpec cache_spec(int type_k, int type_v, int rotate, int head_dim) {
    if (rotate < 0) rotate = (cache_4bit(type_k) || cache_4bit(type_v)) && (head_dim & (head_dim - 1)) == 0;
    return (CacheSpec){type_k, type_v, rotate != 0};
}

// Refuses a spec this model's heads cannot be stored in; the one check, before anything is sized.
static int cache_spec_check(const CacheSpec *spec, int head_dim) {
    for (int i = 0; i < 2; i++) {
        int type = i ? spec->type_v : spec->type_k;
        if (type < 0 || type >= N_CACHE_TYPES) return fail("unknown cache type %d (0..%d)", type, N_CACHE_TYPES - 1);
    }
    const char *k = CACHE_TYPES[spec->type_k].name, *v = CACHE_TYPES[spec->type_v].name;
    if (head_dim % CACHE_TYPES[spec->type_k].values || head_dim % CACHE_TYPES[spec->type_v].values)
        return fail("cache types %s/%s: the cache type's group of %d does not divide head_dim (%d)", k, v, CACHE_GROUP,
                    head_dim);
    if (spec->rotate && (head_dim & (head_dim - 1)))
        return fail("cache types %s/%s: rotation needs head_dim to be a power of two (%d)", k, v, head_dim);
    return 0;
}

// Bytes a pool of `slots` rows a plane takes, keys and values with the sink slots of `sink_blocks`
// blocks (what pool_init allocates).
static double cache_bytes(const Config *p, const CacheSpec *spec, int slots, int sink_blocks) {
    int sinks = cache_has_sink(spec->type_k) + cache_has_sink(spec->type_v);
    return (double)p->n_layers * ((double)slots * (row_bytes(spec->type_k, kv_dim(p)) + row_bytes(spec->type_v, kv_dim(p))) +
                                  (double)sinks * sink_blocks * row_bytes(CACHE_SINK_TYPE, kv_dim(p)));
}

// Rows of block b in every plane: block_size, or fewer for a last block cut short.
static int block_rows(const KVPool *c, int b) {
    int left = c->slots - b * c->block_size;
    return left < c->block_size ? left : c->block_size;
}

// A pool of n_blocks blocks of block_size positions, `slots` rows a plane (n_blocks * block_size,
// or fewer: the last block cut short), for a spec checked by cache_spec_check. sink_blocks: how many
// blocks can be a sequence's first (n_blocks, or 1 when the blocks stay in order). prefix_cache:
// register full blocks for reuse. key_mean (n_layers, n_kv_heads, head_dim) or NULL is the model's,
// for iq4_nl keys.
static int pool_init(KVPool *c, const Config *p, const CacheSpec *spec, int n_blocks, int block_size, int slots,
                     int sink_blocks, int prefix_cache, const float *key_mean) {
    memset(c, 0, sizeof *c);
    c->spec = *spec;
    c->n_layers = p->n_layers;
    c->n_kv_heads = p->n_kv_heads;
    c->kv_dim = kv_dim(p);
    c->head_dim = p->head_dim;
    c->block_size = block_size;
    c->n_blocks = n_blocks;
    c->slots = slots;
    c->head_row_k = row_bytes(spec->type_k, c->head_dim);
    c->head_row_v = row_bytes(spec->type_v, c->head_dim);
    c->head_row_sink = row_bytes(CACHE_SINK_TYPE, c->head_dim);
    c->sink_blocks = sink_blocks;
    size_t rows = (size_t)c->n_layers * c->n_kv_heads * slots, sinks = (size_t)c->n_layers * c->n_kv_heads * sink_blocks;
    c->keys = alloc_zeroed(rows, c->head_row_k);
    c->values = alloc_zeroed(rows, c->head_row_v);
    c->sink_keys = cache_has_sink(spec->type_k) ? alloc_zeroed(sinks, c->head_row_sink) : NULL;
    c->sink_values = cache_has_sink(spec->type_v) ? alloc_zeroed(sinks, c->head_row_sink) : NULL;
    c->key_mean = spec->type_k == CACHE_IQ4_NL ? key_mean : NULL;
    c->sink_used = alloc_zeroed(n_blocks, 1);
    c->refs = alloc_zeroed(n_blocks, sizeof(int));
    c->free_list = alloc_zeroed(n_blocks, sizeof(int));
    c->free_at = alloc_zeroed(n_blocks, sizeof(int));
    c->prefix_cache = prefix_cache;
    c->serial = alloc_zeroed(n_blocks, sizeof(uint64_t));
    c->parent = alloc_zeroed(n_blocks, sizeof(uint64_t));
    c->block_tokens = alloc_zeroed((size_t)n_blocks * block_size, sizeof(int));
    for (c->n_buckets = 16; c->n_buckets < 2 * n_blocks; c->n_buckets *= 2) {}
    c->bucket = alloc_zeroed(c->n_buckets, sizeof(int));
    c->next_in_bucket = alloc_zeroed(n_blocks, sizeof(int));
    c->lru_prev = alloc_zeroed(n_blocks, sizeof(int));
    c->lru_next = alloc_zeroed(n_blocks, sizeof(int));
    c->lru_first = c->lru_last = -1;
    c->next_serial = 1;
    if (!c->keys || !c->values || (!c->sink_keys && cache_has_sink(spec->type_k)) ||
        (!c->sink_values && cache_has_sink(spec->type_v)) || !c->sink_used || !c->refs || !c->free_list || !c->free_at || !c->serial || !c->parent ||
        !c->block_tokens || !c->bucket || !c->next_in_bucket || !c->lru_prev || !c->lru_next)
        return -1;
    for (int i = 0; i < c->n_buckets; i++) c->bucket[i] = -1;
    for (int b = n_blocks - 1; b >= 0; b--) c->free_at[b] = c->n_free, c->free_list[c->n_free++] = b;
    return 0;
}

static void pool_free(KVPool *c) {
    free(c->keys); free(c->values); free(c->sink_keys); free(c->sink_values); free(c->sink_used);
    free(c->refs); free(c->free_list); free(c->free_at); free(c->serial); free(c->parent); free(c->block_tokens);
    free(c->bucket); free(c->next_in_bucket); free(c->lru_prev); free(c->lru_next);
    memset(c, 0, sizeof *c);
}

// Where row (layer, head) of block b's row `row` lies in the keys (value 0) or values (1).
static uint8_t *pool_row(const KVPool *c, int value, int layer, int head, int b, int row) {
    size_t plane = (size_t)layer * c->n_kv_heads + head, slot = (size_t)b * c->block_size + row;
    return (value ? c->values : c->keys) + (plane * c->slots + slot) * (value ? c->head_row_v : c->head_row_k);
}

// Block b's sink slot of (layer, head) in keys or values, or NULL when they have no sink.
static uint8_t *pool_sink(const KVPool *c, int value, int layer, int head, int b) {
    uint8_t *sink = value ? c->sink_values : c->sink_keys;
    if (!sink || b >= c->sink_blocks) return NULL;
    return sink + (((size_t)layer * c->n_kv_heads + head) * c->sink_blocks + b) * c->head_row_sink;
}

// `rows` rows of `bytes` at dst set to `fill` stored as `type`.
static void fill_rows(int type, uint8_t *dst, size_t rows, size_t bytes, float fill, int head_dim) {
    fill_row(type, dst, fill, head_dim);
    for (size_t r = 1; r < rows; r++) memcpy(dst + r * bytes, dst, bytes);
}

// Every row of block b, sink slots included, set to `fill` (as in pool_fill).
static void block_fill(KVPool *c, int b, float fill) {
    for (int l = 0; l < c->n_layers; l++)
        for (int h = 0; h < c->n_kv_heads; h++)
            for (int value = 0; value < 2; value++) {
                int type = value ? c->spec.type_v : c->spec.type_k;
                fill_rows(type, pool_row(c, value, l, h, b, 0), block_rows(c, b), value ? c->head_row_v : c->head_row_k, fill, c->head_dim);
                uint8_t *sink = pool_sink(c, value, l, h, b);
                if (sink) fill_rows(CACHE_SINK_TYPE, sink, 1, c->head_row_sink, fill, c->head_dim);
            }
}

// Every slot of the pool set to `fill`: 0 to forget, NaN so that any read of a slot never written
// shows (in every type: NaN stores as a NaN scale in the q types).
static void pool_fill(KVPool *c, float fill) {
    size_t rows = (size_t)c->n_layers * c->n_kv_heads * c->slots, sinks = (size_t)c->n_layers * c->n_kv_heads * c->sink_blocks;
    if (fill == 0) { // all-zero bytes are 0 in every type
        memset(c->keys, 0, rows * c->head_row_k);
        memset(c->values, 0, rows * c->head_row_v);
        if (c->sink_keys) memset(c->sink_keys, 0, sinks * c->head_row_sink);
        if (c->sink_values) memset(c->sink_values, 0, sinks * c->head_row_sink);
        return;
    }
    fill_rows(c->spec.type_k, c->keys, rows, c->head_row_k, fill, c->head_dim);
    fill_rows(c->spec.type_v, c->values, rows, c->head_row_v, fill, c->head_dim);
    if (c->sink_keys) fill_rows(CACHE_SINK_TYPE, c->sink_keys, sinks, c->head_row_sink, fill, c->head_dim);
    if (c->sink_values) fill_rows(CACHE_SINK_TYPE, c->sink_values, sinks, c->head_row_sink, fill, c->head_dim);
}

// Block src's rows, sink slots included, copied into block dst (copy-on-write).
static void block_copy(KVPool *c, int dst, int src) {
    for (int l = 0; l < c->n_layers; l++)
        for (int h = 0; h < c->n_kv_heads; h++)
            for (int value = 0; value < 2; value++) {
                memcpy(pool_row(c, value, l, h, dst, 0), pool_row(c, value, l, h, src, 0),
                       (size_t)block_rows(c, src) * (value ? c->head_row_v : c->head_row_k));
                uint8_t *to = pool_sink(c, value, l, h, dst), *from = pool_sink(c, value, l, h, src);
                if (to && from) memcpy(to, from, c->head_row_sink);
            }
    c->sink_used[dst] = c->sink_used[src];
}

// ---- The pool's books: references, the free list, the prefix cache and its LRU list

// The bucket of a block named by (parent, its tokens).
static int prefix_bucket(const KVPool *c, uint64_t parent, const int *tokens) {
    uint64_t h = hash_bytes((const char *)tokens, c->block_size * (int)sizeof(int)) ^ hash_pair(parent);
    return (int)(h & (uint64_t)(c->n_buckets - 1));
}

// The registered block that follows registration `parent` and holds `tokens`, or -1. Names are
// compared in full: a hash collision cannot hand out the wrong block.
static int prefix_find(const KVPool *c, uint64_t parent, const int *tokens) {
    for (int b = c->bucket[prefix_bucket(c, parent, tokens)]; b >= 0; b = c->next_in_bucket[b])
        if (c->parent[b] == parent && !memcmp(c->block_tokens + (size_t)b * c->block_size, tokens, c->block_size * sizeof(int)))
            return b;
    return -1;
}

static void lru_unlink(KVPool *c, int b) {
    if (c->lru_prev[b] >= 0) c->lru_next[c->lru_prev[b]] = c->lru_next[b];
    else c->lru_first = c->lru_next[b];
    if (c->lru_next[b] >= 0) c->lru_prev[c->lru_next[b]] = c->lru_prev[b];
    else c->lru_last = c->lru_prev[b];
    c->n_cached--;
}

// Block b is no longer registered: its rows may change.
static void prefix_forget(KVPool *c, int b) {
    int *at = &c->bucket[prefix_bucket(c, c->parent[b], c->block_tokens + (size_t)b * c->block_size)];
    while (*at != b) at = &c->next_in_bucket[*at];
    *at = c->next_in_bucket[b];
    c->serial[b] = c->parent[b] = 0;
}

// Block b, full and holding `tokens` after registration `parent`, registered for reuse.
static void prefix_register(KVPool *c, int b, uint64_t parent, const int *tokens) {
    memcpy(c->block_tokens + (size_t)b * c->block_size, tokens, c->block_size * sizeof(int));
    c->serial[b] = c->next_serial++;
    c->parent[b] = parent;
    int *head = &c->bucket[prefix_bucket(c, parent, tokens)];
    c->next_in_bucket[b] = *head;
    *head = b;
}

// Blocks a sequence can still be given: free ones and unreferenced cached ones.
static int pool_available(const KVPool *c) { return c->n_free + c->n_cached; }

// Free block b out of the free list (swapped with the top).
static void free_list_remove(KVPool *c, int b) {
    int last = c->free_list[--c->n_free];
    c->free_list[c->free_at[b]] = last;
    c->free_at[last] = c->free_at[b];
    c->free_at[b] = -1;
}

// The free block a table that cannot grow into the block after its last should take: the middle of
// the longest run of free blocks, so that the table and whatever comes before it both have room to
// grow into blocks that lie one after another (attention reads consecutive blocks as one run, and
// runs of one block read slowly: 8 sequences of 1,024 positions whose blocks alternated stepped in
// 17.6 ms against 9.8 ms, SmolLM2 Q8_0, q8_0 cache).
static int free_block_with_room(const KVPool *c) {
    int best = -1, best_len = 0;
    for (int b = 0; b < c->n_blocks;) {
        if (c->free_at[b] < 0) {
            b++;
            continue;
        }
        int start = b;
        while (b < c->n_blocks && c->free_at[b] >= 0) b++;
        if (b - start > best_len) best = start, best_len = b - start;
    }
    return best + best_len / 2;
}

// An unreferenced block, now referenced once: block `want` when it is free (the one after a table's
// last: the table stays one run), else a free one with room after it, else the cached one released
// longest ago (forgotten). -1 when there is none.
static int pool_take(KVPool *c, int want) {
    int b;
    if (c->n_free) {
        b = want >= 0 && want < c->n_blocks && c->free_at[want] >= 0 ? want : free_block_with_room(c);
        free_list_remove(c, b);
    } else if (c->lru_first >= 0) {
        b = c->lru_first;
        lru_unlink(c, b);
        prefix_forget(c, b);
    } else return -1;
    c->refs[b] = 1;
    c->sink_used[b] = 0;
    return b;
}

// One more table holds block b (a cached one leaves the LRU list).
static void pool_hold(KVPool *c, int b) {
    if (c->refs[b]++ == 0 && c->serial[b]) lru_unlink(c, b);
}

// A table lets go of block b: when none holds it, a registered block waits in the LRU list (the
// most recently released last), any other goes back to the free list.
static void pool_release(KVPool *c, int b) {
    if (--c->refs[b] > 0) return;
    if (c->serial[b]) {
        c->lru_prev[b] = c->lru_last;
        c->lru_next[b] = -1;
        if (c->lru_last >= 0) c->lru_next[c->lru_last] = b;
        else c->lru_first = b;
        c->lru_last = b;
        c->n_cached++;
        return;
    }
    if (c->poison) block_fill(c, b, NAN);
    c->free_at[b] = c->n_free;
    c->free_list[c->n_free++] = b;
}

// ---- A sequence's cache: its block table

// An empty table in pool c for up to `capacity` positions; `in_order`: every block of the pool, in
// order (the pool is the sequence's own: slot = position).
static int cache_init(KVCache *s, KVPool *c, int capacity, int in_order) {
    memset(s, 0, sizeof *s);
    s->pool = c;
    s->capacity = capacity;
    s->max_blocks = (capacity + c->block_size - 1) / c->block_size;
    s->table = alloc_zeroed(s->max_blocks, sizeof(int));
    s->tokens = alloc_zeroed(capacity, sizeof(int));
    if (!s->table || !s->tokens) return -1;
    if (in_order) {
        for (int i = 0; i < s->max_blocks; i++) s->table[i] = pool_take(c, i);
        s->n_table = s->max_blocks;
    }
    return 0;
}

// Lets go of every block the table holds, the last first: cached blocks are evicted in that order,
// so a prefix loses its tail before its head (without which the tail cannot be found).
static void cache_free(KVCache *s) {
    for (int i = s->n_table - 1; s->table && i >= 0; i--) pool_release(s->pool, s->table[i]);
    free(s->table);
    free(s->tokens);
    free(s->h2o_position);
    free(s->h2o_score);
    memset(s, 0, sizeof *s);
}

// Blocks the pool must hand out before positions pos..pos+n-1 can be written: new ones past the
// table, and copies of shared blocks the writes land in.
static int cache_blocks_needed(const KVCache *s, int pos, int n) {
    if (n <= 0) return 0;
    int bs = s->pool->block_size, first = pos / bs, last = (pos + n - 1) / bs, need = 0;
    for (int i = first; i <= last; i++) need += i >= s->n_table || s->pool->refs[s->table[i]] > 1;
    return need;
}

// The block entry i of a table would best take: the one after entry i - 1, so that the table stays
// one run; none (-1) for its first.
static int block_after(const KVCache *s, int i) { return i ? s->table[i - 1] + 1 : -1; }

// Makes positions pos..pos+n-1 writable: blocks taken for them past the table, a shared block
// copied (copy-on-write), a registered one forgotten (its rows are about to change). The caller
// checked cache_blocks_needed against pool_available.
static void cache_reserve(KVCache *s, int pos, int n) {
    KVPool *c = s->pool;
    int bs = c->block_size;
    for (int i = pos / bs; n > 0 && i <= (pos + n - 1) / bs; i++) {
        if (i >= s->n_table) {
            s->table[s->n_table] = pool_take(c, block_after(s, s->n_table));
            s->n_table++;
            continue;
        }
        int b = s->table[i];
        if (c->refs[b] > 1) {
            int copy = pool_take(c, block_after(s, i));
            block_copy(c, copy, b);
            pool_release(c, b);
            s->table[i] = copy;
        } else if (c->serial[b])
            prefix_forget(c, b);
        if (s->registered > i) s->registered = i;
    }
    // row 0 (position 0) of a type with a sink goes to its block's sink slot
    if (pos == 0 && n > 0 && (c->sink_keys || c->sink_values) && s->table[0] < c->sink_blocks) c->sink_used[s->table[0]] = 1;
}

// Registers the table's full blocks below position len that are not yet registered, each named by
// the block before it and its tokens. A block the cache already holds under that name (another
// sequence computed the same prefix) stays this sequence's own, and so do the blocks after it.
static void cache_register(KVCache *s, int len) {
    KVPool *c = s->pool;
    int bs = c->block_size;
    if (!c->prefix_cache) return;
    while ((s->registered + 1) * bs <= len) {
        int i = s->registered, b = s->table[i];
        uint64_t parent = i ? c->serial[s->table[i - 1]] : 0;
        if (!c->serial[b]) {
            if (prefix_find(c, parent, s->tokens + (size_t)i * bs) >= 0) return;
            prefix_register(c, b, parent, s->tokens + (size_t)i * bs);
        }
        s->registered++;
    }
}

// For an empty table: takes the longest run of registered blocks that hold tokens' first positions,
// leaving at least one token to run (its logits are wanted). Returns the positions taken.
static int cache_reuse_prefix(KVCache *s, const int *tokens, int n) {
    KVPool *c = s->pool;
    int bs = c->block_size, i = 0;
    uint64_t parent = 0;
    if (!c->prefix_cache || s->n_table) return 0;
    for (; (i + 1) * bs < n && i < s->max_blocks; i++) {
        int b = prefix_find(c, parent, tokens + (size_t)i * bs);
        if (b < 0) break;
        pool_hold(c, b);
        s->table[s->n_table++] = b;
        parent = c->serial[b];
    }
    s->registered = i;
    memcpy(s->tokens, tokens, (size_t)i * bs * sizeof(int));
    c->prefix_hits += (long long)i * bs;
    return i * bs;
}

// Keeps positions 0..len-1: the blocks after them go back to the pool.
static void cache_truncate(KVCache *s, int len) {
    int keep = (len + s->pool->block_size - 1) / s->pool->block_size;
    while (s->n_table > keep) pool_release(s->pool, s->table[--s->n_table]);
    if (s->registered > len / s->pool->block_size) s->registered = len / s->pool->block_size;
}

// dst (an uninitialized cache) becomes a copy of src's table, sharing every block.
static int cache_fork(KVCache *dst, const KVCache *src) {
    if (cache_init(dst, src->pool, src->capacity, 0)) return -1;
    for (int i = 0; i < src->n_table; i++) pool_hold(src->pool, dst->table[i] = src->table[i]);
    dst->n_table = src->n_table;
    dst->registered = src->registered;
    dst->window = src->window, dst->sinks = src->sinks, dst->sink_rows = src->sink_rows, dst->recent = src->recent;
    memcpy(dst->tokens, src->tokens, (size_t)src->capacity * sizeof(int));
    return 0;
}

// ---- Writing and reading rows

// Whether row `row` of the sequence lies in its block's sink slot (it holds position 0, and the
// cache type has a sink).
static int cache_in_sink(const KVCache *s, int row) {
    return row % s->pool->block_size == 0 && s->pool->sink_used[s->table[row / s->pool->block_size]];
}

// Where row `row` of (layer, head) lies in the keys (value 0) or the values (1), and its type:
// position 0 of a type with a sink lies in its block's sink slot, every other row in its block.
// (Without a window, row = position.)
static uint8_t *cache_slot(const KVCache *s, int value, int layer, int head, int pos, int *type) {
    const KVPool *c = s->pool;
    int b = s->table[pos / c->block_size];
    uint8_t *sink = cache_in_sink(s, pos) ? pool_sink(c, value, layer, head, b) : NULL;
    if (sink) {
        *type = CACHE_SINK_TYPE;
        return sink;
    }
    *type = value ? c->spec.type_v : c->spec.type_k;
    return pool_row(c, value, layer, head, b, pos % c->block_size);
}

// One head's head_dim values x, less `mean` (NULL: none), stored as `type` at dst, turned by the
// rotation first when the cache rotates.
static void store_head(const KVPool *c, int type, uint8_t *dst, const float *x, const float *mean) {
    float head[c->head_dim]; // head_dim <= 4096 (check_config): 16 KB at most
    for (int i = 0; i < c->head_dim; i++) head[i] = mean ? x[i] - mean[i] : x[i];
    if (c->spec.rotate) hadamard(head, c->head_dim);
    store_row(type, dst, head, c->head_dim);
}

// Stores n tokens' keys and values, k and v (n, kv_dim), token t at position pos[t] of seqs[t]'s
// cache (all in one pool, made writable by cache_reserve), in one layer: the one place rows are
// converted to the cache's types. Inside a parallel region every thread of the team calls it, and
// they share the head rows out (iq4_nl's scale search takes about a microsecond a block); a
// worksharing loop, so it ends in a barrier.
static void cache_write(KVCache *const *seqs, const int *pos, int n, int layer, const float *k, const float *v) {
    const KVPool *c = seqs[0]->pool;
#pragma omp for schedule(static)
    for (int task = 0; task < n * c->n_kv_heads * 2; task++) { // (token, kv head, keys or values)
        int t = task / (2 * c->n_kv_heads), h = task / 2 % c->n_kv_heads, value = task % 2, type;
        size_t at = (size_t)t * c->kv_dim + (size_t)h * c->head_dim;
        const float *mean = c->key_mean && !value ? c->key_mean + (size_t)layer * c->kv_dim + (size_t)h * c->head_dim : NULL;
        uint8_t *dst = cache_slot(seqs[t], value, layer, h, pos[t], &type);
        store_head(c, type, dst, (value ? v : k) + at, mean);
    }
}

// The run of positions pos.. of a layer, at most n long (ranges are read run after run): the rows
// up to the end of pos's block, and on through the blocks after it while the table holds them in
// order; position 0 alone when it lies in a sink slot.
static KVRun cache_run(const KVCache *s, int layer, int pos, int n) {
    const KVPool *c = s->pool;
    KVRun r;
    r.keys = cache_slot(s, 0, layer, 0, pos, &r.type_k);
    r.values = cache_slot(s, 1, layer, 0, pos, &r.type_v);
    int sink_k = cache_in_sink(s, pos) && c->sink_keys, sink_v = cache_in_sink(s, pos) && c->sink_values;
    r.key_stride = sink_k ? c->head_row_sink : c->head_row_k;
    r.value_stride = sink_v ? c->head_row_sink : c->head_row_v;
    r.key_head = sink_k ? c->sink_blocks * c->head_row_sink : (size_t)c->slots * c->head_row_k;
    r.value_head = sink_v ? c->sink_blocks * c->head_row_sink : (size_t)c->slots * c->head_row_v;
    int bs = c->block_size, i = pos / bs, len = bs - pos % bs;
    while (len < n && i + 1 < s->n_table && s->table[i + 1] == s->table[i] + 1) len += bs, i++;
    r.n = sink_k || sink_v ? 1 : len < n ? len : n;
    return r;
}

// One stored head row as float32 head_dim values, rotated back.
static void load_head(const KVPool *c, int type, const uint8_t *src, float *out) {
    load_row(type, src, out, c->head_dim);
    if (c->spec.rotate) hadamard(out, c->head_dim);
}

// Copies n positions of a layer out as float32 keys and values, (n, kv_dim) each: what the cache
// holds, dequantized and rotated back (iq4_nl keys: less the model's key_mean, as they are stored).
static void cache_read(const KVCache *s, int layer, int pos, int n, float *keys, float *values) {
    const KVPool *c = s->pool;
    for (int t = 0; t < n; t++)
        for (int h = 0; h < c->n_kv_heads; h++) {
            size_t at = (size_t)t * c->kv_dim + (size_t)h * c->head_dim;
            int type;
            const uint8_t *src = cache_slot(s, 0, layer, h, pos + t, &type);
            load_head(c, type, src, keys + at);
            src = cache_slot(s, 1, layer, h, pos + t, &type);
            load_head(c, type, src, values + at);
        }
}

// Moves the window on by a block: the window's oldest block goes back to the pool, and every key
// left in it is turned back by block_size positions (RoPE by the angles whose cos and sin, head_dim
// / 2 of them, are given), since its place inside the cache moved down as much. So positions stay
// StreamingLLM's (places inside the cache) while keys are stored turned, as attention reads them:
// llama.cpp's K-shift. Quantized keys are stored again, rounded once more. Runs on `threads`.
static void cache_slide(KVCache *s, const float *cos, const float *sin, int threads) {
    KVPool *c = s->pool;
    int bs = c->block_size, first = s->sink_rows / bs, hd = c->head_dim;
    pool_release(c, s->table[first]);
    memmove(s->table + first, s->table + first + 1, (size_t)(s->n_table - first - 1) * sizeof(int));
    s->n_table--;
    s->recent -= bs;
    memmove(s->tokens + s->sink_rows, s->tokens + s->sink_rows + bs, (size_t)s->recent * sizeof(int));
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int task = 0; task < c->n_layers * c->n_kv_heads; task++) {
        int layer = task / c->n_kv_heads, head = task % c->n_kv_heads;
        const float *mean = c->key_mean ? c->key_mean + (size_t)layer * c->kv_dim + (size_t)head * hd : NULL;
        float k[hd];
        for (int row = s->sink_rows; row < s->sink_rows + s->recent; row++) {
            int type;
            uint8_t *slot = cache_slot(s, 0, layer, head, row, &type);
            load_head(c, type, slot, k);
            for (int i = 0; mean && i < hd; i++) k[i] += mean[i];
            for (int j = 0; j < hd / 2; j++) {
                float x0 = k[2 * j], x1 = k[2 * j + 1];
                k[2 * j] = x0 * cos[j] - x1 * sin[j];
                k[2 * j + 1] = x0 * sin[j] + x1 * cos[j];
            }
            store_head(c, type, slot, k, mean);
        }
    }
}

// H2O's eviction: with h2o_budget rows held, the row to go is the one that has drawn the least
// attention (the sum, over every token since it came, every layer and every query head, of the
// softmax weight that token gave it), among the rows older than the last h2o_recent positions (of a
// sequence that has run `len`); a tie goes to the older position. The last row moves into its place.
static void cache_evict(KVCache *s, int len) {
    const KVPool *c = s->pool;
    int victim = -1;
    for (int row = 0; row < s->h2o_rows; row++) {
        if (s->h2o_position[row] >= len - s->h2o_recent) continue;
        if (victim < 0 || s->h2o_score[row] < s->h2o_score[victim] ||
            (s->h2o_score[row] == s->h2o_score[victim] && s->h2o_position[row] < s->h2o_position[victim]))
            victim = row;
    }
    int last = --s->h2o_rows;
    if (victim == last) return;
    for (int l = 0; l < c->n_layers; l++)
        for (int h = 0; h < c->n_kv_heads; h++)
            for (int value = 0; value < 2; value++) {
                int type;
                uint8_t *to = cache_slot(s, value, l, h, victim, &type);
                memcpy(to, cache_slot(s, value, l, h, last, &type), row_bytes(type, c->head_dim));
            }
    s->tokens[victim] = s->tokens[last];
    s->h2o_position[victim] = s->h2o_position[last];
    s->h2o_score[victim] = s->h2o_score[last];
}

// ---- Reading the cache: attention's scores and weighted sums, straight from the stored type

// A kv head's group of query heads as its keys are read with them (cache_query makes it): float32,
// rotated as the keys are; for int8 keys (q8_0, q4_0, iq4_nl) also quantized per CACHE_GROUP values as the
// matmuls quantize activations (scale max|x| / 127), so that each score is int8 dot products.
// The int8 form comes in 64-value chunks, as the AVX-512 kernel takes it (an odd last block of a
// head is zero-padded to a whole chunk).
typedef struct {
    const float *f;       // (group, hd)
    const int8_t *q;      // (group, chunks * 64) int8 queries
    const int32_t *neg_bias; // (group, chunks * 16) -128 * the sum of each 4 of them (see kv_dot_row)
    const float *lanes;   // (group, chunks * 16) scale of block 2c in lanes 0-7 of chunk c, of 2c + 1 in 8-15
} KVQuery;

static int query_chunks(int hd) { return (hd + 63) / 64; }

// Bytes of one query head's int8 form (cache_query's int8 buffer holds group of them).
static size_t query_int8_bytes(int hd) { return (size_t)query_chunks(hd) * (64 + 16 * sizeof(int32_t) + 16 * sizeof(float)); }

// The group of query heads q (group x head_dim) as this cache's keys need them: rotated into f when
// the keys are, and quantized into int8 (group x query_int8_bytes) when they are int8.
static KVQuery cache_query(const KVPool *c, const float *q, int group, float *f, uint8_t *int8) {
    int hd = c->head_dim, chunks = query_chunks(hd);
    if (c->spec.rotate) {
        memcpy(f, q, (size_t)group * hd * sizeof(float));
        for (int g = 0; g < group; g++) hadamard(f + (size_t)g * hd, hd);
        q = f;
    }
    KVQuery out = {q, NULL, NULL, NULL};
    if (!cache_int8(c->spec.type_k)) return out;
    int8_t *qi = (int8_t *)int8;
    int32_t *neg_bias = (int32_t *)(int8 + (size_t)group * chunks * 64);
    float *lanes = (float *)(neg_bias + (size_t)group * chunks * 16);
    for (int g = 0; g < group; g++) {
        int8_t *qg = qi + (size_t)g * chunks * 64;
        memset(qg, 0, (size_t)chunks * 64);
        for (int b = 0; b < 2 * chunks; b++) {
            float s = b * CACHE_GROUP < hd ? quantize_group(qg + b * CACHE_GROUP, q + (size_t)g * hd + b * CACHE_GROUP, CACHE_GROUP) : 0;
            for (int lane = 0; lane < 8; lane++) lanes[((size_t)g * chunks + b / 2) * 16 + (b % 2) * 8 + lane] = s;
        }
        for (int i = 0; i < chunks * 16; i++)
            neg_bias[(size_t)g * chunks * 16 + i] = -128 * (qg[4 * i] + qg[4 * i + 1] + qg[4 * i + 2] + qg[4 * i + 3]);
    }
    return (KVQuery){q, qi, neg_bias, lanes};
}

// Attention outputs of `group` heads (a weighted sum of stored values) turned back from the values'
// rotation, in place.
static void cache_output(const KVPool *c, float *out, int group) {
    if (c->spec.rotate)
        for (int g = 0; g < group; g++) hadamard(out + (size_t)g * c->head_dim, c->head_dim);
}

#define KV_TILE_ROWS 16 // rows kv_dot scores together: their sums across lanes are one transpose
#define KV_DOT_HEADS 8  // query heads kv_dot scores per pass over a tile of rows
#define KV_AXPY_HEADS 4 // heads kv_axpy sums per pass over the rows: 4 x 64 outputs stay in registers

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__) && defined(__F16C__)
#define KV_SIMD 1

// 16 values of an f32, f16 or bf16 row as float32.
static inline __m512 kv_floats16(int type, const uint8_t *p) {
    if (type == CACHE_F16) return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p));
    if (type == CACHE_BF16)
        return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
    return _mm512_loadu_ps((const float *)p);
}

// The int8 values of a q8_0/q4_0/iq4_nl block and, when `two`, the next one: 64 bytes, block one's
// in bytes 0-31 (for a missing second block, values the zero-padded query never counts).
static inline __m512i kv_block_pair(int type, const uint8_t *block, int two) {
    int bytes = CACHE_TYPES[type].bytes;
    if (type == CACHE_Q8_0) {
        __m256i second = two ? _mm256_loadu_si256((const __m256i *)(block + bytes + 2)) : _mm256_setzero_si256();
        return _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *)(block + 2))), second, 1);
    }
    __m128i second = two ? _mm_loadu_si128((const __m128i *)(block + bytes + 2)) : _mm_set1_epi8((char)0x88); // q = 8: 0
    __m256i both = _mm256_inserti128_si256(_mm256_castsi128_si256(_mm_loadu_si128((const __m128i *)(block + 2))), second, 1);
    __m256i nibble = _mm256_set1_epi8(15);
    __m256i low = _mm256_and_si256(both, nibble), high = _mm256_and_si256(_mm256_srli_epi16(both, 4), nibble);
    __m512i z = _mm512_inserti64x4(_mm512_castsi256_si512(low), high, 1);  // low 1, low 2, high 1, high 2
    z = _mm512_shuffle_i64x2(z, z, _MM_SHUFFLE(3, 1, 2, 0));               // low 1, high 1, low 2, high 2
    if (type == CACHE_Q4_0) return _mm512_sub_epi8(z, _mm512_set1_epi8(8));
    return _mm512_shuffle_epi8(_mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)IQ4_NL_LEVELS)), z); // each 128-bit lane looks up the 16 levels
}

// acc[g] += the lane-wise products of one f16/bf16/f32 key row with heads g0.. (heads of them), 16
// values at a time (int8 keys are kv_dot_int8_simd's).
static inline void kv_dot_row(int type, const uint8_t *k, const KVQuery *q, int g0, int heads, int hd, __m512 *acc) {
    for (int g = 0; g < KV_DOT_HEADS; g++) acc[g] = _mm512_setzero_ps();
    size_t width = CACHE_TYPES[type].bytes;
    for (int c = 0; c < hd; c += 16) {
        __m512 kc = kv_floats16(type, k + c * width);
        for (int g = 0; g < KV_DOT_HEADS; g++) {
            if (g >= heads) continue;
            acc[g] = _mm512_fmadd_ps(_mm512_loadu_ps(q->f + (size_t)(g0 + g) * hd + c), kc, acc[g]);
        }
    }
}

// 32 values of a q8_0/q4_0/iq4_nl block as float32, in two registers.
static inline void kv_block_floats(int type, const uint8_t *block, __m512 *x) {
    __m512 d = _mm512_set1_ps(_cvtsh_ss(block[0] | block[1] << 8));
    __m128i a = _mm_loadu_si128((const __m128i *)(block + 2)), b;
    if (type == CACHE_Q8_0) b = _mm_loadu_si128((const __m128i *)(block + 18));
    else nibble_values(type, a, &a, &b);
    x[0] = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(a)), d);
    x[1] = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(b)), d);
}

// The first regs * 16 values (regs 1..4) of a row at p as float32 in x[0..regs), zeros after.
static inline void kv_floats64(int type, const uint8_t *p, int regs, __m512 *x) {
    if (cache_int8(type)) {
        kv_block_floats(type, p, x);
        if (regs > 2) kv_block_floats(type, p + CACHE_TYPES[type].bytes, x + 2);
        else x[2] = x[3] = _mm512_setzero_ps();
        return;
    }
    for (int j = 0; j < 4; j++)
        x[j] = j < regs ? kv_floats16(type, p + (size_t)16 * j * CACHE_TYPES[type].bytes) : _mm512_setzero_ps();
}
#endif


#ifdef KV_SIMD
// The int32 lanes of 16 rows' dot products (one vector a row; lanes 0-7 one block's partial sums,
// 8-15 the next block's) summed within each block, exactly: *first and *second hold the 16 rows'
// sums of their first and second block, in row order. Three levels of shuffles and adds (as sum16's,
// but keeping the two blocks apart), then a permute to row order.
static inline void block_sums16(const __m512i *v, __m512i *first, __m512i *second) {
    __m512i a[8], b[4], d[2];
    for (int i = 0; i < 8; i++) // quarters: v[2i] block 1, v[2i] block 2, v[2i+1] block 1, block 2 (4 partials each)
        a[i] = _mm512_add_epi32(_mm512_shuffle_i32x4(v[2 * i], v[2 * i + 1], 0x88), _mm512_shuffle_i32x4(v[2 * i], v[2 * i + 1], 0xDD));
    for (int i = 0; i < 4; i++) // 2 partials each of a[2i]'s and a[2i+1]'s quarter
        b[i] = _mm512_add_epi32(_mm512_unpacklo_epi32(a[2 * i], a[2 * i + 1]), _mm512_unpackhi_epi32(a[2 * i], a[2 * i + 1]));
    for (int i = 0; i < 2; i++) // lane 4k + e: the sum of a[4i + e]'s quarter k: row 8i + 2e + k / 2, block k % 2
        d[i] = _mm512_add_epi32(_mm512_unpacklo_epi64(b[2 * i], b[2 * i + 1]), _mm512_unpackhi_epi64(b[2 * i], b[2 * i + 1]));
    // row r's first block: d[r / 8] lane 4 * 2 * (r % 2) + (r % 8) / 2 (index + 16 for d[1]); its second: 4 lanes on
    const __m512i rows = _mm512_setr_epi32(0, 8, 1, 9, 2, 10, 3, 11, 16, 24, 17, 25, 18, 26, 19, 27);
    *first = _mm512_permutex2var_epi32(d[0], rows, d[1]);
    *second = _mm512_permutex2var_epi32(d[0], _mm512_add_epi32(rows, _mm512_set1_epi32(4)), d[1]);
}

// kv_dot's AVX-512 body for int8 keys (q8_0, q4_0, iq4_nl): for each tile of KV_TILE_ROWS rows and
// each two blocks (64 values), every query head's int32 products with the tile's keys, summed
// exactly within each block (block_sums16), then scaled by the block's key and query scales and
// added block after block, 16 rows at a time, as the portable loop adds them. Each row thus costs
// one dpbusd a head and two blocks (SmolLM2's head_dim 64, 3 heads a kv head, q8_0 keys: 2.3 ns a
// row, against 4.6 for scaling and summing each row's lanes in float).
static inline __attribute__((always_inline)) void kv_dot_int8_simd(const KVRun *r, const uint8_t *k0, const KVQuery *q, int group, int hd,
                                                                   float scale, float *att, size_t att_stride, int type) {
    int chunks = query_chunks(hd), bytes = CACHE_TYPES[type].bytes;
    __m512 acc[group];
    __m512i keys[KV_TILE_ROWS];
    uint16_t scales[2][KV_TILE_ROWS];
    for (int i0 = 0; i0 < r->n; i0 += KV_TILE_ROWS) {
        int rows = r->n - i0 < KV_TILE_ROWS ? r->n - i0 : KV_TILE_ROWS;
        for (int g = 0; g < group; g++) acc[g] = _mm512_setzero_ps();
        prefetch_ahead(k0, r->key_stride, i0, rows, r->n);
        for (int c = 0; c < chunks; c++) {
            int two = 64 * c + 32 < hd;
            for (int i = 0; i < KV_TILE_ROWS; i++) { // the tile's keys of these two blocks, and their scales
                if (i >= rows) {
                    keys[i] = _mm512_setzero_si512();
                    scales[0][i] = scales[1][i] = 0;
                    continue;
                }
                const uint8_t *row = k0 + (size_t)(i0 + i) * r->key_stride, *block = row + (size_t)2 * c * bytes;
                keys[i] = _mm512_xor_si512(kv_block_pair(type, block, two), _mm512_set1_epi8((char)0x80));
                memcpy(&scales[0][i], block, 2);
                if (two) memcpy(&scales[1][i], block + bytes, 2);
                else scales[1][i] = 0;
            }
            __m512 d0 = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)scales[0]));
            __m512 d1 = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)scales[1]));
            for (int g = 0; g < group; g++) {
                size_t at = (size_t)g * chunks + c;
                __m512i qv = _mm512_loadu_si512(q->q + at * 64), bias = _mm512_loadu_si512(q->neg_bias + at * 16), sums[KV_TILE_ROWS];
                for (int i = 0; i < KV_TILE_ROWS; i++) sums[i] = _mm512_dpbusd_epi32(bias, keys[i], qv);
                __m512i first, second;
                block_sums16(sums, &first, &second);
                acc[g] = _mm512_add_ps(acc[g], _mm512_mul_ps(_mm512_cvtepi32_ps(first), _mm512_mul_ps(d0, _mm512_set1_ps(q->lanes[at * 16]))));
                if (two)
                    acc[g] = _mm512_add_ps(acc[g], _mm512_mul_ps(_mm512_cvtepi32_ps(second), _mm512_mul_ps(d1, _mm512_set1_ps(q->lanes[at * 16 + 8]))));
            }
        }
        for (int g = 0; g < group; g++)
            _mm512_mask_storeu_ps(att + (size_t)g * att_stride + i0, (__mmask16)((1u << rows) - 1), _mm512_mul_ps(acc[g], _mm512_set1_ps(scale)));
    }
}
#endif

#ifdef KV_SIMD
// kv_dot's AVX-512 body for f32, f16 and bf16 keys: tiles of KV_TILE_ROWS rows, each row read once for up
// to KV_DOT_HEADS heads, the tile's scores summed across lanes together.
static inline __attribute__((always_inline)) void kv_dot_simd(const KVRun *r, const uint8_t *k0, const KVQuery *q, int group, int hd,
                                                              float scale, float *att, size_t att_stride, int type) {
    __m512 part[KV_DOT_HEADS][KV_TILE_ROWS];
    for (int i0 = 0; i0 < r->n; i0 += KV_TILE_ROWS) {
        int rows = r->n - i0 < KV_TILE_ROWS ? r->n - i0 : KV_TILE_ROWS;
        for (int g0 = 0; g0 < group; g0 += KV_DOT_HEADS) {
            int heads = group - g0 < KV_DOT_HEADS ? group - g0 : KV_DOT_HEADS;
            for (int i = 0; i < KV_TILE_ROWS; i++) {
                __m512 acc[KV_DOT_HEADS];
                if (i < rows) {
                    const uint8_t *k = k0 + (size_t)(i0 + i) * r->key_stride;
                    if (g0 == 0) prefetch_ahead(k0, r->key_stride, i0 + i, 1, r->n);
                    kv_dot_row(type, k, q, g0, heads, hd, acc);
                } else
                    for (int g = 0; g < KV_DOT_HEADS; g++) acc[g] = _mm512_setzero_ps();
                for (int g = 0; g < heads; g++) part[g][i] = acc[g];
            }
            for (int g = 0; g < heads; g++)
                _mm512_mask_storeu_ps(att + (size_t)(g0 + g) * att_stride + i0, (__mmask16)((1u << rows) - 1),
                                      _mm512_mul_ps(sum16(part[g]), _mm512_set1_ps(scale)));
        }
    }
}

// kv_dot_simd for one type, head_dim 64 (the common size) as a constant, or any other.
static inline __attribute__((always_inline)) void kv_dot_typed(const KVRun *r, const uint8_t *k0, const KVQuery *q, int group, int hd,
                                                               float scale, float *att, size_t att_stride, int type) {
    if (hd == 64) kv_dot_simd(r, k0, q, group, 64, scale, att, att_stride, type);
    else kv_dot_simd(r, k0, q, group, hd, scale, att, att_stride, type);
}
#endif

// Scores of `group` query heads (as cache_query gives them) against the run's keys of kv head
// `head`: att[g * att_stride + i] = scale * q_g . k_i. With int8 keys each score is a sum over
// blocks of key scale x query scale x an int8 dot product.
static void kv_dot(const KVRun *r, int head, const KVQuery *q, int group, int hd, float scale, float *att,
                   size_t att_stride) {
    const uint8_t *k0 = r->keys + head * r->key_head;
#ifdef KV_SIMD
    if (cache_int8(r->type_k) || hd % 16 == 0) {
        switch (r->type_k) { // constant types (and head_dims, in kv_dot_typed) unroll into their own copies
        case CACHE_F32: kv_dot_typed(r, k0, q, group, hd, scale, att, att_stride, CACHE_F32); return;
        case CACHE_F16: kv_dot_typed(r, k0, q, group, hd, scale, att, att_stride, CACHE_F16); return;
        case CACHE_BF16: kv_dot_typed(r, k0, q, group, hd, scale, att, att_stride, CACHE_BF16); return;
        case CACHE_Q8_0: kv_dot_int8_simd(r, k0, q, group, hd, scale, att, att_stride, CACHE_Q8_0); return;
        case CACHE_Q4_0: kv_dot_int8_simd(r, k0, q, group, hd, scale, att, att_stride, CACHE_Q4_0); return;
        case CACHE_IQ4_NL: kv_dot_int8_simd(r, k0, q, group, hd, scale, att, att_stride, CACHE_IQ4_NL); return;
        }
    }
#endif
    int bytes = CACHE_TYPES[r->type_k].bytes, chunks = query_chunks(hd);
    float row[hd];
    for (int i = 0; i < r->n; i++) {
        const uint8_t *k = k0 + (size_t)i * r->key_stride;
        prefetch_ahead(k0, r->key_stride, i, 1, r->n);
        if (!cache_int8(r->type_k)) {
            const float *kf = (const float *)k;
            if (r->type_k != CACHE_F32) load_row(r->type_k, k, row, hd), kf = row;
            for (int g = 0; g < group; g++) att[(size_t)g * att_stride + i] = dot(q->f + (size_t)g * hd, kf, hd) * scale;
            continue;
        }
        for (int g = 0; g < group; g++) {
            const int8_t *qg = q->q + (size_t)g * chunks * 64;
            float sum = 0;
            for (int b = 0; b < hd / CACHE_GROUP; b++) {
                const uint8_t *block = k + (size_t)b * bytes;
                int isum = 0;
                for (int j = 0; j < CACHE_GROUP; j++) isum += block_value(r->type_k, block, j) * qg[b * CACHE_GROUP + j];
                sum += (float)isum * (block_scale(block) * q->lanes[((size_t)g * chunks + b / 2) * 16 + (b % 2) * 8]);
            }
            att[(size_t)g * att_stride + i] = sum * scale;
        }
    }
}

#define KV_TILE_FLOATS 4096 // values of stored rows the portable kv_axpy widens at once (16 KB of stack)

#ifdef KV_SIMD
// kv_axpy's AVX-512 body for values of `type`: 64 columns (block types: two blocks) at a
// time, KV_AXPY_HEADS heads' sums of them in registers over all the rows.
static inline __attribute__((always_inline)) void kv_axpy_simd(const KVRun *r, const uint8_t *v0, const float *weights, size_t w_stride,
                                                               int group, int hd, float *out, int type) {
    for (int d = 0; d < hd; d += 64) { // 64 columns (block types: two blocks) at a time
        int regs = (hd - d < 64 ? hd - d : 64) / 16;
        const uint8_t *v = v0 + row_bytes(type, d);
        for (int g0 = 0; g0 < group; g0 += KV_AXPY_HEADS) {
            int heads = group - g0 < KV_AXPY_HEADS ? group - g0 : KV_AXPY_HEADS;
            __m512 acc[KV_AXPY_HEADS][4];
            for (int g = 0; g < KV_AXPY_HEADS; g++)
                for (int j = 0; j < 4; j++)
                    acc[g][j] = g < heads && j < regs ? _mm512_loadu_ps(out + (size_t)(g0 + g) * hd + d + 16 * j) : _mm512_setzero_ps();
            for (int i = 0; i < r->n; i++) {
                const uint8_t *row = v + (size_t)i * r->value_stride;
                if (d == 0 && g0 == 0) prefetch_ahead(v, r->value_stride, i, 1, r->n);
                __m512 x[4];
                kv_floats64(type, row, regs, x);
                for (int g = 0; g < KV_AXPY_HEADS; g++) { // a fixed count, unrolled: acc stays in registers
                    if (g >= heads) continue;
                    __m512 w = _mm512_set1_ps(weights[(size_t)(g0 + g) * w_stride + i]);
                    for (int j = 0; j < 4; j++)
                        if (j < regs) acc[g][j] = _mm512_fmadd_ps(w, x[j], acc[g][j]);
                }
            }
            for (int g = 0; g < heads; g++)
                for (int j = 0; j < regs; j++) _mm512_storeu_ps(out + (size_t)(g0 + g) * hd + d + 16 * j, acc[g][j]);
        }
    }
}

// kv_axpy_simd for one type, head_dim 64 as a constant, or any other.
static inline __attribute__((always_inline)) void kv_axpy_typed(const KVRun *r, const uint8_t *v0, const float *weights, size_t w_stride,
                                                                int group, int hd, float *out, int type) {
    if (hd == 64) kv_axpy_simd(r, v0, weights, w_stride, group, 64, out, type);
    else kv_axpy_simd(r, v0, weights, w_stride, group, hd, out, type);
}
#endif

// For each of `group` heads g: out_g (hd, at out + g * hd) += sum over the run's rows i of
// weights[g * w_stride + i] * v_i, the run's values of kv head `head`, each stored value widened in registers
// as it is summed (portable: a tile of rows widened, then summed as float32 rows).
static void kv_axpy(const KVRun *r, int head, const float *weights, size_t w_stride, int group, int hd, float *out) {
    const uint8_t *v0 = r->values + head * r->value_head;
#ifdef KV_SIMD
    if (cache_int8(r->type_v) || hd % 16 == 0) {
        switch (r->type_v) { // constant types unroll into their own copies, as in kv_dot
        case CACHE_F32: kv_axpy_typed(r, v0, weights, w_stride, group, hd, out, CACHE_F32); return;
        case CACHE_F16: kv_axpy_typed(r, v0, weights, w_stride, group, hd, out, CACHE_F16); return;
        case CACHE_BF16: kv_axpy_typed(r, v0, weights, w_stride, group, hd, out, CACHE_BF16); return;
        case CACHE_Q8_0: kv_axpy_typed(r, v0, weights, w_stride, group, hd, out, CACHE_Q8_0); return;
        case CACHE_Q4_0: kv_axpy_typed(r, v0, weights, w_stride, group, hd, out, CACHE_Q4_0); return;
        case CACHE_IQ4_NL: kv_axpy_typed(r, v0, weights, w_stride, group, hd, out, CACHE_IQ4_NL); return;
        }
    }
#endif
    if (r->type_v == CACHE_F32) { // rows stay in cache between the group's passes
        for (int g = 0; g < group; g++)
            weighted_sum(out + (size_t)g * hd, weights + g * w_stride, (const float *)v0, r->value_stride / sizeof(float),
                         r->n, hd);
        return;
    }
    int tile = KV_TILE_FLOATS / hd > 0 ? KV_TILE_FLOATS / hd : 1;
    float rows[(size_t)tile * hd];
    for (int i = 0; i < r->n; i += tile) {
        int count = r->n - i < tile ? r->n - i : tile;
        for (int j = 0; j < count; j++) {
            const uint8_t *row = v0 + (size_t)(i + j) * r->value_stride;
            prefetch_ahead(v0, r->value_stride, i + j, 1, r->n);
            load_row(r->type_v, row, rows + (size_t)j * hd, hd);
        }
        for (int g = 0; g < group; g++)
            weighted_sum(out + (size_t)g * hd, weights + g * w_stride + i, rows, (size_t)hd, count, hd);
    }
}

// ----------------------------------------------------------------------------
// Sequences and pools: a pool holds KV blocks and the scratch of forward blocks; a sequence, a block table in one

#define MAX_BATCH 64                 // tokens a forward block runs together: each weight is read once per block
#define MAX_THREADS 512              // threads a sequence may ask for (each has its own scratch and stack)
#define ATTENTION_TASKS_PER_THREAD 2 // attention splits positions into ranges until it has this many tasks a thread,
#define ATTENTION_MIN_RANGE 64       // but never into ranges shorter than this

// Each thread's own copy of a matmul's input, normalized (fp32) and quantized (int8): every thread
// prepares the whole input itself, which costs little next to the matmul and saves a barrier.
typedef struct {
    float *x;           // (batch, max(dim, q_dim))
    QuantizedRows q;    // (batch, widest matmul input)
} ThreadInput;

// The thread governor. OpenMP threads spin at every barrier until the slowest thread arrives, and
// a forward block has a few barriers per layer. When another process takes one of the cores, the
// thread that shares it with that process is descheduled for whole time slices, and every barrier
// waits for it: two threads then decode slower than one. So the governor watches how much CPU each
// thread got during a block (its CPU time over the block's wall time). When a thread got less than
// GOVERNOR_SHARE in GOVERNOR_STRIKES blocks in a row, the next blocks run on one thread fewer; after
// `backoff` blocks the governor tries one more again, and doubles backoff each time that try finds
// the core still taken. Results do not depend on the team's size: work is always split as for
// RunState.threads.
#define GOVERNOR_SHARE 0.75        // a thread that ran for less of a block's wall time than this was descheduled
#define GOVERNOR_MIN_SECONDS 5e-4  // blocks shorter than this are not judged (timer and wake-up noise)
#define GOVERNOR_STRIKES 2         // blocks in a row with a descheduled thread before the team shrinks (a
                                   // sequence's first block, faulting in weights and scratch, can look like one)
#define GOVERNOR_BACKOFF 16        // blocks run on a smaller team before one more thread is tried,
#define GOVERNOR_BACKOFF_MAX 1024  // doubled after each try that finds a core still taken, up to this

typedef struct {
    int team;            // threads the next block runs on, 1..RunState.threads
    int backoff;         // blocks to run on this team before trying one more thread
    int countdown;       // blocks left before that try
    int trying;          // the last block ran on a team just grown by one
    int strikes;         // judged blocks in a row in which a thread was descheduled
    double *cpu;         // (threads) CPU seconds each thread used during the last block
    long blocks, reduced; // blocks run, and how many of them on fewer than RunState.threads
} Governor;

static void governor_init(Governor *g, int threads) {
    g->team = threads;
    g->backoff = g->countdown = GOVERNOR_BACKOFF;
    g->trying = g->strikes = 0;
    g->blocks = g->reduced = 0;
}

// After a block of `seconds` that ran on g->team of `threads` threads: the team of the next one.
static void governor_update(Governor *g, int threads, double seconds) {
    g->blocks++;
    g->reduced += g->team < threads;
    if (seconds < GOVERNOR_MIN_SECONDS) return;
    double least = INFINITY;
    for (int i = 0; i < g->team; i++) least = fmin(least, g->cpu[i] / seconds);
    g->strikes = g->team > 1 && least < GOVERNOR_SHARE ? g->strikes + 1 : 0;
    if (g->strikes && (g->trying || g->strikes >= GOVERNOR_STRIKES)) { // a core is taken: one thread fewer
        if (g->trying) g->backoff = 2 * g->backoff < GOVERNOR_BACKOFF_MAX ? 2 * g->backoff : GOVERNOR_BACKOFF_MAX;
        g->team--;
        g->countdown = g->backoff;
        g->trying = g->strikes = 0;
        return;
    }
    if (g->trying) { // the larger team ran undisturbed: the core is free again
        g->trying = 0;
        g->backoff = g->countdown = GOVERNOR_BACKOFF;
    }
    if (g->team < threads && --g->countdown <= 0) {
        g->team++;
        g->trying = 1;
    }
}

typedef struct {
    int threads;              // OpenMP threads of this model's parallel regions (at most: see Governor)
    Governor governor;        // how many of them the next forward block runs on
    int batch;                // tokens per forward block
    int input_group;          // the model's Weights.input_group: values per scale of the int8 inputs (0: none)
    int input_sums;           // and whether its q4 matrices need each group's sum
    float *x;                 // (batch, dim) residual stream
    float *xb;                // (batch, q_dim) attention output
    float *q;                 // (batch, q_dim) queries
    float *k, *v;             // (batch, kv_dim) the block's keys and values, until cache_write stores them
    float *hb, *hb2;          // (batch, hidden_dim) SwiGLU
    int capacity;             // positions a sequence it runs may hold
    KVCache **seq;            // (batch) the cache of each token of the block,
    int *pos;                 // (batch) its position there (inside the cache: what RoPE turns it by),
    int *row;                 // (batch) the row its K/V go to, and
    int *head, *tail;         // (batch) the rows it attends: 0..head-1 and tail..row (no window: head 0, tail 0)
    float *att;               // (threads, n_heads / n_kv_heads, capacity) attention weights
    float *drawn;             // (threads, capacity) for an H2O sequence: the weight each row drew in this block
    float *query;             // (threads, n_heads / n_kv_heads, head_dim) a kv head's queries as the cache wants them
    uint8_t *query_int8;      // (threads, n_heads / n_kv_heads, query_int8_bytes) and their int8 form for int8 keys
    float *part_max, *part_sum; // (attention tasks, n_heads / n_kv_heads) per range: max score, sum
    float *part_out;          // (split tasks, n_heads / n_kv_heads, head_dim) per range: unnormalized output
    Rope rope;                // (batch, head_dim / 2) cos/sin of the block's positions
    float *logits;            // (vocab) of the block's last token
    ThreadInput *input;       // (threads)
    size_t bytes;             // all of the above, allocated
} RunState;

// Scratch allocated for a run state, counted for memory accounting.
static void *scratch_alloc(RunState *s, size_t count, size_t size) {
    s->bytes += count * size;
    return alloc_zeroed(count, size);
}

// Scratch for `threads` threads running blocks of up to MAX_BATCH tokens over up to `capacity`
// positions of a model with weights w.
static int state_init(RunState *s, const Config *p, const Weights *w, int threads, int capacity) {
    s->threads = threads;
    governor_init(&s->governor, threads);
    s->governor.cpu = scratch_alloc(s, threads, sizeof(double));
    s->batch = capacity < MAX_BATCH ? capacity : MAX_BATCH;
    s->capacity = capacity;
    s->input_group = w->input_group;
    s->input_sums = w->input_sums;
    size_t B = s->batch, wide = p->dim > q_dim(p) ? p->dim : q_dim(p);
    s->x = scratch_alloc(s, B * p->dim, sizeof(float));
    s->xb = scratch_alloc(s, B * q_dim(p), sizeof(float));
    s->q = scratch_alloc(s, B * q_dim(p), sizeof(float));
    s->k = scratch_alloc(s, B * kv_dim(p), sizeof(float));
    s->v = scratch_alloc(s, B * kv_dim(p), sizeof(float));
    s->hb = scratch_alloc(s, B * p->hidden_dim, sizeof(float));
    s->hb2 = scratch_alloc(s, B * p->hidden_dim, sizeof(float));
    // attention_parts splits fewer tasks than its target into under twice the target
    size_t group = p->n_heads / p->n_kv_heads, split_tasks = 2 * ATTENTION_TASKS_PER_THREAD * (size_t)s->threads;
    size_t tasks = B * p->n_kv_heads > split_tasks ? B * p->n_kv_heads : split_tasks;
    s->seq = scratch_alloc(s, B, sizeof(KVCache *));
    s->pos = scratch_alloc(s, B, sizeof(int));
    s->row = scratch_alloc(s, B, sizeof(int));
    s->head = scratch_alloc(s, B, sizeof(int));
    s->tail = scratch_alloc(s, B, sizeof(int));
    s->att = scratch_alloc(s, (size_t)s->threads * group * capacity, sizeof(float));
    s->drawn = scratch_alloc(s, (size_t)s->threads * capacity, sizeof(float));
    s->query = scratch_alloc(s, (size_t)s->threads * group * p->head_dim, sizeof(float));
    s->query_int8 = scratch_alloc(s, (size_t)s->threads * group, query_int8_bytes(p->head_dim));
    s->part_max = scratch_alloc(s, tasks * group, sizeof(float));
    s->part_sum = scratch_alloc(s, tasks * group, sizeof(float));
    s->part_out = scratch_alloc(s, split_tasks * group * p->head_dim, sizeof(float));
    s->rope.half = p->head_dim / 2;
    s->rope.cos = scratch_alloc(s, B * s->rope.half, sizeof(float));
    s->rope.sin = scratch_alloc(s, B * s->rope.half, sizeof(float));
    s->logits = scratch_alloc(s, p->vocab_size, sizeof(float));
    size_t widest = wide > (size_t)p->hidden_dim ? wide : (size_t)p->hidden_dim;
    size_t groups = s->input_group ? B * widest / s->input_group : 0;
    if (!(s->input = scratch_alloc(s, s->threads, sizeof(ThreadInput)))) return -1;
    for (int i = 0; i < s->threads; i++) {
        ThreadInput *in = &s->input[i];
        in->x = scratch_alloc(s, B * wide, sizeof(float));
        in->q.q = scratch_alloc(s, B * widest + 64, 1); // + 64: the int8 kernels read whole 64-byte chunks
        in->q.scale = scratch_alloc(s, groups + 1, sizeof(float));
        in->q.lane_scale = scratch_alloc(s, B * lane_scales_per_row((int)widest), sizeof(float));
        if (!in->x || !in->q.q || !in->q.scale || !in->q.lane_scale) return -1;
        if (s->input_sums && !(in->q.sum = scratch_alloc(s, groups, sizeof(float)))) return -1;
    }
    return s->governor.cpu && s->seq && s->pos && s->row && s->head && s->tail && s->drawn && s->part_max && s->part_sum && s->part_out && s->x && s->xb && s->q && s->k && s->v && s->hb && s->hb2 && s->att && s->query && s->query_int8 &&
                   s->rope.cos && s->rope.sin && s->logits ? 0 : -1;
}

static void state_free(RunState *s) {
    free(s->x); free(s->xb); free(s->q); free(s->k); free(s->v); free(s->hb); free(s->hb2);
    free(s->governor.cpu); free(s->seq); free(s->pos); free(s->row); free(s->head); free(s->tail); free(s->drawn); free(s->att); free(s->query); free(s->query_int8); free(s->part_max); free(s->part_sum); free(s->part_out); free(s->rope.cos); free(s->rope.sin); free(s->logits);
    for (int i = 0; s->input && i < s->threads; i++) {
        free(s->input[i].x); free(s->input[i].q.q); free(s->input[i].q.scale); free(s->input[i].q.sum);
        free(s->input[i].q.lane_scale);
    }
    free(s->input);
}

// A pool of KV blocks and the scratch that forward blocks over its sequences run in. The sequences
// of one pool run one call at a time (they share the scratch).
typedef struct {
    KVPool cache;
    RunState state;
} Pool;

// One running sequence: its block table in a pool, and how far it has run.
typedef struct {
    KVCache cache;
    Pool *pool;
    int len;            // positions 0..len-1 hold the sequence's tokens; the next one goes at len
    int own_pool;       // the pool is the sequence's own (a single sequence, its blocks in order), freed with it
    struct DeviceSequence *device; // NULL on the CPU; else the backend that runs it (see Backends)
} Sequence;

// Refuses a pool whose KV cache and attention scratch (the parts that grow with the context) would
// not fit in this machine's memory, before anything is allocated.
static int check_pool_size(const Config *p, const CacheSpec *spec, int slots, int sink_blocks, int threads, int capacity) {
    double need = cache_bytes(p, spec, slots, sink_blocks) + (double)threads * (p->n_heads / p->n_kv_heads) * capacity * sizeof(float);
    double ram = (double)sysconf(_SC_PHYS_PAGES) * (double)sysconf(_SC_PAGESIZE), gib = 1024.0 * 1024 * 1024;
    if (ram > 0 && need > ram)
        return fail("a KV cache of %d positions needs %.1f GiB, more than this machine's %.1f GiB: ask for a shorter "
                    "context (-c, or seq_len= in Python) or fewer blocks", slots, need / gib, ram / gib);
    return 0;
}

static void pool_delete(Pool *pool) {
    if (!pool) return;
    pool_free(&pool->cache);
    state_free(&pool->state);
    free(pool);
}

// A pool for m of n_blocks blocks of block_size positions (`slots` rows a plane, sink slots for
// `sink_blocks` first blocks, full blocks registered for reuse when prefix_cache), stored as spec
// says, with scratch for `threads` threads (0: all cores, at most MAX_THREADS) running sequences of
// up to `capacity` positions.
static Pool *pool_new(const Model *m, const CacheSpec *spec, int n_blocks, int block_size, int slots, int sink_blocks,
                      int prefix_cache, int threads, int capacity) {
    if (threads < 0 || threads > MAX_THREADS) {
        fail("threads must be 1..%d, got %d", MAX_THREADS, threads);
        return NULL;
    }
    if (threads == 0) threads = max_threads() < MAX_THREADS ? max_threads() : MAX_THREADS;
    if (cache_spec_check(spec, m->config.head_dim) ||
        check_pool_size(&m->config, spec, slots, sink_blocks, threads, capacity))
        return NULL;
    Pool *pool = alloc_zeroed(1, sizeof *pool);
    if (!pool) return NULL;
    if (pool_init(&pool->cache, &m->config, spec, n_blocks, block_size, slots, sink_blocks, prefix_cache, m->weights.key_mean) ||
        state_init(&pool->state, &m->config, &m->weights, threads, capacity)) {
        pool_delete(pool);
        return NULL;
    }
    return pool;
}

// An empty sequence in pool (which must outlive it), of up to `capacity` positions; in_order: its
// table holds every block of the pool in order.
static Sequence *sequence_new(Pool *pool, int capacity, int in_order) {
    Sequence *seq = alloc_zeroed(1, sizeof *seq);
    if (!seq) return NULL;
    seq->pool = pool;
    if (cache_init(&seq->cache, &pool->cache, capacity, in_order)) {
        cache_free(&seq->cache);
        free(seq);
        return NULL;
    }
    return seq;
}

// Lets go of the sequence's blocks (and its own pool).
static void sequence_delete(Sequence *seq) {
    if (!seq) return;
    cache_free(&seq->cache);
    if (seq->own_pool) pool_delete(seq->pool);
    free(seq);
}

// The rows a window's sinks take (sinks rounded up to whole blocks of bs), or -1 (said) when a window
// of `window` positions (a multiple of bs) and `sinks` do not fit a context of `context`.
static int window_sink_rows(int window, int sinks, int bs, int context) {
    if (window < bs || window % bs || sinks < 0 || sinks > context - window)
        return fail("a window of %d with %d sinks: the window must be a multiple of %d and window + sinks at most the "
                    "model's context (%d)", window, sinks, bs, context);
    return (sinks + bs - 1) / bs * bs;
}

// A single sequence for m in a pool of its own, run on `threads` threads (0: all cores), its cache
// stored as spec says. Without a window (0): up to `context` positions (0: the model's), its blocks
// in order (slot = position). With one: the first `sinks` positions and the last `window` (a
// multiple of BLOCK_SIZE), as long as it runs.
static Sequence *sequence_alone(const Model *m, int context, int threads, const CacheSpec *spec, int window, int sinks) {
    if (context < 0 || context > m->config.seq_len) {
        fail("context %d is outside the model's 1..%d", context, m->config.seq_len);
        return NULL;
    }
    int sink_rows = window ? window_sink_rows(window, sinks, BLOCK_SIZE, m->config.seq_len) : 0;
    if (sink_rows < 0) return NULL;
    int capacity = window ? sink_rows + window : context > 0 ? context : m->config.seq_len;
    int blocks = (capacity + BLOCK_SIZE - 1) / BLOCK_SIZE;
    // a window's blocks leave the table in any order: each can hold a sequence's first position
    Pool *pool = pool_new(m, spec, blocks, BLOCK_SIZE, capacity, window ? blocks : 1, 0, threads, capacity);
    Sequence *seq = pool ? sequence_new(pool, capacity, !window) : NULL;
    if (!seq) {
        pool_delete(pool);
        return NULL;
    }
    seq->own_pool = 1;
    seq->cache.window = window;
    seq->cache.sinks = window ? sinks : 0;
    seq->cache.sink_rows = sink_rows;
    return seq;
}


// ----------------------------------------------------------------------------
// The forward pass

// RoPE's angle per position for pair j of a head: theta^(-2j/head_dim), in double like the reference.
static double rope_freq(const Config *p, int j) { return pow((double)p->rope_theta, -2.0 * j / p->head_dim); }

// cos/sin of position * rope_freq(j) for each token of the block (at s->pos).
static void rope_table(RunState *s, const Config *p, int n) {
    int half = p->head_dim / 2;
    for (int j = 0; j < half; j++) {
        double freq = rope_freq(p, j);
        for (int t = 0; t < n; t++) {
            double angle = (double)s->pos[t] * freq;
            s->rope.cos[t * half + j] = (float)cos(angle);
            s->rope.sin[t * half + j] = (float)sin(angle);
        }
    }
}

// The steps below run on every thread of the one parallel region forward_block opens. Work split
// across threads is a worksharing loop ("omp for", a barrier at its end); the matmul inputs each
// thread prepares for itself (ThreadInput) need no barrier.

// This thread's int8 copy of x (n x in) when the model has quantized matrices (any of them may be
// the next matmul's); NULL when all are fp32.
static const QuantizedRows *quantize_rows(RunState *s, const float *x, int n, int in) {
    int gs = s->input_group;
    if (!gs) return NULL;
    QuantizedRows *q = &s->input[thread_index()].q;
    for (int t = 0; t < n; t++)
        quantize_row(q->q + (size_t)t * in, q->scale + (size_t)t * (in / gs), q->sum ? q->sum + (size_t)t * (in / gs) : NULL,
                     q->lane_scale + t * lane_scales_per_row(in), x + (size_t)t * in, in, gs);
    return q;
}

// RMSNorm of n rows of x into this thread's input (quantized into *xq too when the model has int8
// kernels). x must be complete: the step before ended in a barrier.
static const float *norm_rows(RunState *s, const float *x, const int *rows, const float *weight, int n, int dim, float eps,
                              const QuantizedRows **xq) {
    float *out = s->input[thread_index()].x;
    for (int t = 0; t < n; t++) rmsnorm(out + (size_t)t * dim, x + (size_t)(rows ? rows[t] : t) * dim, weight, dim, eps);
    *xq = quantize_rows(s, out, n, dim);
    return out;
}

// The rows of its sequence's cache that a token attends, up to attended row hi: the i-th is row i,
// or i + skip past `head` (see RunState).
typedef struct {
    const KVCache *cache;
    int layer, head, skip, hi;
} Attended;

// The run of consecutive rows that starts at attended row i.
static KVRun attended_run(const Attended *a, int i) {
    return cache_run(a->cache, a->layer, i < a->head ? i : i + a->skip, (i < a->head && a->hi > a->head ? a->head : a->hi) - i);
}

// Attention of the query heads (of token t) that share kv head `kv_head`, over the rows lo..hi-1
// of those it attends (counted through rows 0..head-1, then tail..: see RunState), read run by run.
// For each head g it leaves the max score, the sum of e^(score - max), and out = that sum's terms
// times the values (unnormalized, so that ranges computed apart can be merged). att holds group x
// (hi - lo) scores.
static void attend_range(const Model *m, RunState *s, int layer, int t, int kv_head, int lo, int hi, float *att,
                         float *out, float *max, float *sum) {
    const Config *p = &m->config;
    const KVCache *cache = s->seq[t];
    int hd = p->head_dim, group = p->n_heads / p->n_kv_heads, len = hi - lo;
    float scale = 1.0f / sqrtf((float)hd);
    const float *q = s->q + (size_t)t * q_dim(p) + (size_t)kv_head * group * hd; // the group's heads are adjacent
    KVQuery query = cache_query(cache->pool, q, group, s->query + (size_t)thread_index() * group * hd,
                                s->query_int8 + (size_t)thread_index() * group * query_int8_bytes(hd));
    Attended rows = {cache, layer, s->head[t], s->tail[t] - s->head[t], hi};
    for (int i = lo; i < hi;) {
        KVRun run = attended_run(&rows, i);
        kv_dot(&run, kv_head, &query, group, hd, scale, att + (i - lo), (size_t)len);
        i += run.n;
    }
    for (int g = 0; g < group; g++) sum[g] = exp_shifted(att + (size_t)g * len, len, &max[g]);
    if (cache->h2o_budget) { // H2O counts the weight each row draws (attention_parts keeps rows 0..row whole)
        float *drawn = s->drawn + (size_t)thread_index() * s->capacity + lo;
        for (int g = 0; g < group; g++)
            for (int i = 0; i < len; i++) drawn[i] += att[(size_t)g * len + i] / sum[g];
    }
    memset(out, 0, (size_t)group * hd * sizeof(float));
    for (int i = lo; i < hi;) {
        KVRun run = attended_run(&rows, i);
        kv_axpy(&run, kv_head, att + (i - lo), (size_t)len, group, hd, out);
        i += run.n;
    }
    cache_output(cache->pool, out, group);
}

// Rows token t attends.
static int attended(const RunState *s, int t) { return s->head[t] + s->row[t] - s->tail[t] + 1; }

// How many ranges each (token, kv head) splits its positions into: enough tasks to keep every
// thread busy when there are few (decoding one token with a few kv heads), else 1.
static int attention_parts(const RunState *s, int n, int n_kv_heads, int len) {
    if (s->seq[0]->h2o_budget) return 1; // H2O reads each row's weight: one softmax over all rows
    int tasks = n * n_kv_heads, target = ATTENTION_TASKS_PER_THREAD * s->threads;
    int parts = tasks >= target ? 1 : (target + tasks - 1) / tasks;
    return len / parts >= ATTENTION_MIN_RANGE ? parts : 1; // short ranges are not worth a merge
}

// Causal attention of the block's queries, each over its own sequence's cache up to its position;
// the block's own keys and values are already in it. Query head h reads kv head h / (n_heads /
// n_kv_heads). Split ranges are merged as in flash-decoding: out = sum over ranges of
// e^(max_r - max) out_r / sum of e^(max_r - max) sum_r.
static void attention(const Model *m, RunState *s, int layer, int n) {
    const Config *p = &m->config;
    int hd = p->head_dim, kvh = p->n_kv_heads, group = p->n_heads / kvh, qd = q_dim(p), longest = 0;
    for (int t = 0; t < n; t++) longest = attended(s, t) > longest ? attended(s, t) : longest;
    int parts = attention_parts(s, n, kvh, longest);
    float *att = s->att + (size_t)thread_index() * group * s->capacity;
#pragma omp for schedule(static)
    for (int task = 0; task < n * kvh * parts; task++) {
        int t = task / (kvh * parts), h = task / parts % kvh, part = task % parts, len = attended(s, t);
        int chunk = (len + parts - 1) / parts, lo = part * chunk, hi = lo + chunk < len ? lo + chunk : len;
        float *max = s->part_max + (size_t)task * group, *sum = s->part_sum + (size_t)task * group;
        float *out = parts == 1 ? s->xb + (size_t)t * qd + (size_t)h * group * hd : s->part_out + (size_t)task * group * hd;
        if (lo >= hi) { // an empty range (a short causal row) adds nothing
            for (int g = 0; g < group; g++) max[g] = -INFINITY, sum[g] = 0;
            continue;
        }
        attend_range(m, s, layer, t, h, lo, hi, att, out, max, sum);
        if (parts == 1)
            for (int i = 0; i < group * hd; i++) out[i] /= sum[i / hd];
    }
    if (parts == 1) return;
#pragma omp for schedule(static)
    for (int head = 0; head < n * p->n_heads; head++) { // merge the ranges of each (token, query head)
        int t = head / p->n_heads, h = head % p->n_heads, first = (t * kvh + h / group) * parts, g = h % group;
        float max = -INFINITY, total = 0, *out = s->xb + (size_t)t * qd + (size_t)h * hd;
        for (int r = 0; r < parts; r++) max = fmaxf(max, s->part_max[(size_t)(first + r) * group + g]);
        memset(out, 0, hd * sizeof(float));
        for (int r = 0; r < parts; r++) {
            size_t at = (size_t)(first + r) * group + g;
            if (s->part_sum[at] == 0) continue;
            float w = expf(s->part_max[at] - max);
            total += w * s->part_sum[at];
            axpy(out, w, s->part_out + at * hd, hd);
        }
        for (int d = 0; d < hd; d++) out[d] /= total;
    }
}

// gate[i] = silu(gate[i]) * up[i] = gate[i] / (1 + e^-gate[i]) * up[i], for n values.
static void silu_mul(float *gate, const float *up, int n) {
    int i = 0;
#if defined(__AVX512F__)
    for (; i < n; i += 16) {
        __mmask16 m = n - i >= 16 ? 0xFFFF : (__mmask16)((1u << (n - i)) - 1);
        __m512 g = _mm512_maskz_loadu_ps(m, gate + i), e = exp16(_mm512_sub_ps(_mm512_setzero_ps(), g));
        __m512 silu = _mm512_div_ps(g, _mm512_add_ps(_mm512_set1_ps(1.0f), e));
        _mm512_mask_storeu_ps(gate + i, m, _mm512_mul_ps(silu, _mm512_maskz_loadu_ps(m, up + i)));
    }
#endif
    for (; i < n; i++) gate[i] = gate[i] / (1.0f + expf(-gate[i])) * up[i];
}

#define GATE_ROWS 16 // hidden rows gate_up computes and finishes together: one exp16 a token

// The feed-forward's two input matmuls and its gate in one loop: the thread that computes a block
// of hidden rows for W1 and W3 also finishes it, hb = silu(x W1^T) * x W3^T.
static void gate_up(RunState *s, Matrix w1, Matrix w3, const float *x, const QuantizedRows *xq, int n, int in, int hid) {
    Projection gate = {s->hb, w1, hid, 0, NULL}, up = {s->hb2, w3, hid, 0, NULL};
#pragma omp for schedule(static)
    for (int b = 0; b < (hid + GATE_ROWS - 1) / GATE_ROWS; b++) {
        int first = GATE_ROWS * b, end = hid - first < GATE_ROWS ? hid : first + GATE_ROWS;
        for (int i = first; i < end; i += 4) matmul_block(&gate, i, end - i < 4 ? end - i : 4, x, xq, n, in);
        for (int i = first; i < end; i += 4) matmul_block(&up, i, end - i < 4 ? end - i : 4, x, xq, n, in);
        for (int t = 0; t < n; t++) silu_mul(s->hb + (size_t)t * hid + first, s->hb2 + (size_t)t * hid + first, end - first);
    }
}

// One layer for the block's n tokens: attention, then the SwiGLU feed-forward, each added to the
// residual stream x. The block's keys and values go into the cache before attention reads it.
static void layer_forward(const Model *m, RunState *s, int l, int n) {
    const Config *p = &m->config;
    const Weights *w = &m->weights;
    int dim = p->dim, hid = p->hidden_dim, qd = q_dim(p), kvd = kv_dim(p);

    Matrix wq = matrix_at(w->wq, l, (size_t)qd * dim);
    const QuantizedRows *xq;
    const float *xn = norm_rows(s, s->x, NULL, w->rms_att + (size_t)l * dim, n, dim, p->norm_eps, &xq);
    Projection qkv[3] = {{s->q, wq, qd, 0, &s->rope},
                         {s->k, matrix_at(w->wk, l, (size_t)kvd * dim), kvd, 0, &s->rope},
                         {s->v, matrix_at(w->wv, l, (size_t)kvd * dim), kvd, 0, NULL}};
    matmuls(qkv, 3, xn, xq, n, dim);
    cache_write(s->seq, s->row, n, l, s->k, s->v); // every thread: they share the rows out
    attention(m, s, l, n);
    Matrix wo = matrix_at(w->wo, l, (size_t)dim * qd);
    xq = quantize_rows(s, s->xb, n, qd);
    matmul((Projection){s->x, wo, dim, 1, NULL}, s->xb, xq, n, qd);

    Matrix w1 = matrix_at(w->w1, l, (size_t)hid * dim), w2 = matrix_at(w->w2, l, (size_t)dim * hid);
    xn = norm_rows(s, s->x, NULL, w->rms_ffn + (size_t)l * dim, n, dim, p->norm_eps, &xq);
    gate_up(s, w1, matrix_at(w->w3, l, (size_t)hid * dim), xn, xq, n, dim, hid);
    xq = quantize_rows(s, s->hb, n, hid);
    matmul((Projection){s->x, w2, dim, 1, NULL}, s->hb, xq, n, hid);
}

// Runs the block's n <= batch tokens through every layer, token t at position s->pos[t] of the
// sequence whose cache is s->seq[t] (made writable there), writing their K/V into the caches; then
// the logits of the n_rows tokens rows[] (the classifier is the biggest matrix: rows nobody reads
// are skipped) into out (n_rows x vocab).
static void forward_block(const Model *m, RunState *s, const int *tokens, int n, const int *rows, int n_rows, float *out) {
    const Config *p = &m->config;
    const Weights *w = &m->weights;
    int dim = p->dim;
    for (int t = 0; t < n; t++) embed(s->x + (size_t)t * dim, w->tok_embeddings, tokens[t], dim);
    rope_table(s, p, n);
    memset(s->governor.cpu, 0, s->threads * sizeof(double)); // a thread the runtime did not start counts as descheduled
    double start = clock_seconds(CLOCK_MONOTONIC);
#pragma omp parallel num_threads(s->governor.team)
    {
        double cpu = clock_seconds(CLOCK_THREAD_CPUTIME_ID);
        for (int l = 0; l < p->n_layers; l++) layer_forward(m, s, l, n);
        const QuantizedRows *xq = NULL;
        const float *xn = norm_rows(s, s->x, rows, w->rms_final, n_rows, dim, p->norm_eps, &xq);
        if (n_rows) matmul((Projection){out, w->wcls, p->vocab_size, 0, NULL}, xn, xq, n_rows, dim);
        s->governor.cpu[thread_index()] = clock_seconds(CLOCK_THREAD_CPUTIME_ID) - cpu;
    }
    governor_update(&s->governor, s->threads, clock_seconds(CLOCK_MONOTONIC) - start);
}

static int check_tokens(const Config *p, const int *tokens, int n) {
    for (int i = 0; i < n; i++)
        if (tokens[i] < 0 || tokens[i] >= p->vocab_size)
            return fail("token id %d is outside the vocab of %d", tokens[i], p->vocab_size);
    return 0;
}

// Refuses a step whose new positions need more blocks than the pool can hand out.
static int check_blocks(const KVPool *c, int need) {
    if (need > pool_available(c))
        return fail("out of KV blocks: the step needs %d new blocks and the pool has %d of %d left", need,
                    pool_available(c), c->n_blocks);
    return 0;
}

// cos and sin (head_dim / 2 each) of RoPE's angles for -positions: what turns a key back by them.
static void rope_back(const Config *p, int positions, float *cos_out, float *sin_out) {
    for (int j = 0; j < p->head_dim / 2; j++) {
        double angle = -(double)positions * rope_freq(p, j);
        cos_out[j] = (float)cos(angle);
        sin_out[j] = (float)sin(angle);
    }
}

// Tokens a windowed cache, of a sequence that has run len, takes before the window must move
// again: up to the sinks' end, or up to the window's (a full window moves a block first).
static int window_room(const KVCache *c, int len) {
    if (len < c->sinks) return c->sinks - len;
    return c->recent == c->window ? c->pool->block_size : c->window - c->recent;
}

// Moves the window of a sequence that has run len on by a block when it is full (cache_slide),
// on `threads` threads.
static void window_move(KVCache *c, const Config *p, int len, int threads) {
    if (len < c->sinks || c->recent < c->window) return;
    float cos_back[p->head_dim / 2], sin_back[p->head_dim / 2];
    rope_back(p, c->pool->block_size, cos_back, sin_back);
    cache_slide(c, cos_back, sin_back, threads);
}

// Runs any number of tokens at positions pos.. of one sequence in blocks; logits of every token
// into out (n x vocab), or with out NULL only the last token's into state.logits. A sequence in a
// shared pool first lets go of its positions from pos on (pos <= len); a windowed one runs on from
// its end or starts again at 0, past its context as long as it goes. The sequence then holds
// positions 0..pos+n-1 (or, windowed, its sinks and the window's last).
static int device_forward(const Model *m, Sequence *seq, const int *tokens, int n, int pos, float *out); // Backends
static int forward(const Model *m, Sequence *seq, const int *tokens, int n, int pos, float *out) {
    const Config *p = &m->config;
    RunState *s = &seq->pool->state;
    KVCache *c = &seq->cache;
    int context = c->h2o_budget ? p->seq_len : c->capacity; // H2O's positions are the tokens'
    if ((c->window || c->h2o_budget) && pos != 0 && pos != seq->len)
        return fail("a %s sequence runs on from its end (%d) or starts again at 0, not at %d", c->window ? "windowed" : "H2O",
                    seq->len, pos);
    if (c->window ? n < 0 || n > INT_MAX - pos : n < 0 || pos < 0 || pos > context || n > context - pos)
        return fail("positions %d..%d are outside the context of %d tokens", pos, pos + n - 1, context);
    if (!seq->own_pool && pos > seq->len)
        return fail("position %d is past the sequence's end (%d): a pooled sequence grows without gaps", pos, seq->len);
    if (check_tokens(p, tokens, n)) return -1;
    if (seq->device) return device_forward(m, seq, tokens, n, pos, out);
    if (c->window && pos == 0) c->recent = 0;
    if (c->h2o_budget && pos == 0) c->h2o_rows = 0;
    if (!seq->own_pool || c->window) cache_truncate(c, c->window ? (pos < c->sinks ? pos : c->sink_rows + c->recent) : pos);
    int rows[MAX_BATCH];
    for (int done = 0; done < n;) {
        int at = pos + done, chunk = n - done < s->batch ? n - done : s->batch;
        if (c->window) { // no block crosses from the sinks into the window, or past a full window
            window_move(c, p, at, s->threads);
            int room = window_room(c, at);
            if (chunk > room) chunk = room;
        }
        if (c->h2o_budget) { // a token at a time: each may evict, by the weights the ones before it gave
            chunk = 1;
            if (c->h2o_rows == c->h2o_budget) cache_evict(c, at);
            c->h2o_position[c->h2o_rows] = at;
            c->h2o_score[c->h2o_rows] = 0;
            memset(s->drawn, 0, (size_t)s->threads * s->capacity * sizeof(float));
        }
        int row = c->h2o_budget ? c->h2o_rows : c->window && at >= c->sinks ? c->sink_rows + c->recent : at;
        if (check_blocks(c->pool, cache_blocks_needed(c, row, chunk))) return -1;
        cache_reserve(c, row, chunk);
        memcpy(c->tokens + row, tokens + done, (size_t)chunk * sizeof(int));
        for (int t = 0; t < chunk; t++) {
            s->seq[t] = c;
            s->row[t] = row + t;
            s->pos[t] = c->h2o_budget ? at : row + t - (row >= c->sink_rows && c->window ? c->sink_rows - c->sinks : 0);
            s->head[t] = c->window && at >= c->sinks ? c->sinks : 0;
            s->tail[t] = c->window && at >= c->sinks ? c->sink_rows : 0;
            rows[t] = t;
        }
        if (out) forward_block(m, s, tokens + done, chunk, rows, chunk, out + (size_t)done * p->vocab_size);
        else forward_block(m, s, tokens + done, chunk, rows + chunk - 1, 1, s->logits);
        if (c->window && at >= c->sinks) c->recent += chunk;
        if (c->h2o_budget) {
            c->h2o_rows++;
            for (int i = 0; i < s->threads; i++)
                for (int r = 0; r < c->h2o_rows; r++) c->h2o_score[r] += s->drawn[(size_t)i * s->capacity + r];
        }
        done += chunk;
    }
    if (out && n > 0) memcpy(s->logits, out + (size_t)(n - 1) * p->vocab_size, p->vocab_size * sizeof(float));
    seq->len = pos + n;
    if (!c->window) cache_register(c, seq->len);
    return 0;
}

// Tokens a pooled sequence can take in its next step: a windowed one up to its sinks' end, or up to
// its window's (a full window moves a block first), any other up to its capacity.
static int step_room(const Sequence *seq) {
    return seq->cache.window ? window_room(&seq->cache, seq->len) : seq->cache.capacity - seq->len;
}

// The row a windowed sequence's next token goes to (any other's: its position).
static int next_row(const Sequence *seq) {
    const KVCache *c = &seq->cache;
    return c->window && seq->len >= c->sinks ? c->sink_rows + c->recent : seq->len;
}

// Rows the sequence's cache holds: those before its next token's, or H2O's kept ones.
static int held_rows(const Sequence *seq) { return seq->cache.h2o_budget ? seq->cache.h2o_rows : next_row(seq); }

// One step of many sequences of one pool: sequence i takes counts[i] >= 1 new tokens (prompt chunks
// and decode tokens alike; tokens holds them one sequence after another) at its end, at most
// step_room of them. The tokens run in blocks of up to `batch`, each reading every weight once, each
// token attending to its own sequence; logits (n x vocab) gets each sequence's last token's. A full
// window moves first; then, out of blocks, nothing else changes and it returns -2.
static int step(const Model *m, Pool *pool, Sequence **seqs, const int *counts, const int *tokens, int n, float *logits) {
    const Config *p = &m->config;
    RunState *s = &pool->state;
    int total = 0, need = 0;
    for (int i = 0; i < n; i++) {
        if (seqs[i]->pool != pool || seqs[i]->own_pool) return fail("sequence %d of the step is not in this pool", i);
        for (int j = 0; j < i; j++)
            if (seqs[j] == seqs[i]) return fail("sequence %d appears twice in the step", i);
        if (counts[i] < 1 || counts[i] > step_room(seqs[i]))
            return fail("sequence %d holds %d positions and can take %d tokens in this step, not %d", i, seqs[i]->len,
                        step_room(seqs[i]), counts[i]);
        if (check_tokens(p, tokens + total, counts[i])) return -1;
        total += counts[i];
    }
    for (int i = 0; i < n; i++) {
        KVCache *c = &seqs[i]->cache;
        if (c->window) window_move(c, p, seqs[i]->len, s->threads);
        need += cache_blocks_needed(c, next_row(seqs[i]), counts[i]);
    }
    if (check_blocks(&pool->cache, need)) return -2;
    for (int i = 0, at = 0; i < n; at += counts[i++]) {
        int row = next_row(seqs[i]);
        cache_reserve(&seqs[i]->cache, row, counts[i]);
        memcpy(seqs[i]->cache.tokens + row, tokens + at, (size_t)counts[i] * sizeof(int));
    }
    int rows[MAX_BATCH], i = 0, into = 0; // the sequence whose token is next, and how many of it have run
    for (int done = 0; done < total;) {
        int chunk = total - done < s->batch ? total - done : s->batch, n_rows = 0, first_row = -1;
        for (int t = 0; t < chunk; t++) {
            KVCache *c = &seqs[i]->cache;
            int windowed = c->window && seqs[i]->len >= c->sinks; // in the window (not the sinks)
            s->seq[t] = c;
            s->row[t] = next_row(seqs[i]) + into;
            s->pos[t] = windowed ? c->sinks + c->recent + into : seqs[i]->len + into;
            s->head[t] = windowed ? c->sinks : 0;
            s->tail[t] = windowed ? c->sink_rows : 0;
            if (++into == counts[i]) { // the sequence's last token: its logits are wanted
                if (first_row < 0) first_row = i;
                rows[n_rows++] = t;
                i++, into = 0;
            }
        }
        forward_block(m, s, tokens + done, chunk, rows, n_rows, n_rows ? logits + (size_t)first_row * p->vocab_size : NULL);
        done += chunk;
    }
    for (int j = 0; j < n; j++) {
        KVCache *c = &seqs[j]->cache;
        if (c->window && seqs[j]->len >= c->sinks) c->recent += counts[j];
        seqs[j]->len += counts[j];
        if (!c->window) cache_register(c, seqs[j]->len);
    }
    return 0;
}

// ----------------------------------------------------------------------------
// The sampler: greedy, temperature, top-k, top-p

typedef struct { float prob; int index; } ProbIndex;

typedef struct {
    int vocab_size;
    float temperature, topp;
    int topk;
    uint64_t rng_state;
    ProbIndex *candidates; // (vocab) scratch
} Sampler;

static uint32_t random_u32(uint64_t *state) { // xorshift*
    *state ^= *state >> 12;
    *state ^= *state << 25;
    *state ^= *state >> 27;
    return (uint32_t)((*state * 0x2545F4914F6CDD1Dull) >> 32);
}

static float random_f32(uint64_t *state) { return (random_u32(state) >> 8) / 16777216.0f; }

static int argmax(const float *x, int n) {
    int best = 0;
    for (int i = 1; i < n; i++) if (x[i] > x[best]) best = i;
    return best;
}

static int by_prob_desc(const void *a, const void *b) {
    float pa = ((const ProbIndex *)a)->prob, pb = ((const ProbIndex *)b)->prob;
    return (pa < pb) - (pa > pb);
}

static void min_heap_sift_down(ProbIndex *h, int n, int i) {
    for (;;) {
        int c = 2 * i + 1;
        if (c >= n) return;
        if (c + 1 < n && h[c + 1].prob < h[c].prob) c++;
        if (h[i].prob <= h[c].prob) return;
        ProbIndex tmp = h[i];
        h[i] = h[c];
        h[c] = tmp;
        i = c;
    }
}

// The k most probable tokens, most probable first: a min-heap of the best k while scanning.
static int top_k(const float *probs, int n, int k, ProbIndex *out) {
    for (int i = 0; i < k; i++) out[i] = (ProbIndex){probs[i], i};
    for (int i = k / 2 - 1; i >= 0; i--) min_heap_sift_down(out, k, i);
    for (int i = k; i < n; i++) {
        if (probs[i] <= out[0].prob) continue;
        out[0] = (ProbIndex){probs[i], i};
        min_heap_sift_down(out, k, 0);
    }
    qsort(out, k, sizeof *out, by_prob_desc);
    return k;
}

// Candidates above the smallest probability top-p could keep, most probable first (llama2.c's trick).
// The most probable token is always kept, even when every probability is under the cutoff (top-p
// below 1/vocab over near-uniform probabilities).
static int top_p_candidates(const float *probs, int n, float topp, ProbIndex *out) {
    float cutoff = (1.0f - topp) / (n - 1);
    int size = 0;
    for (int i = 0; i < n; i++) if (probs[i] >= cutoff) out[size++] = (ProbIndex){probs[i], i};
    if (size == 0) {
        int best = argmax(probs, n);
        out[size++] = (ProbIndex){probs[best], best};
    }
    qsort(out, size, sizeof *out, by_prob_desc);
    return size;
}

// Samples from sorted candidates, keeping the smallest prefix whose mass reaches topp of their total.
static int sample_sorted(const ProbIndex *c, int n, float topp, float coin) {
    float total = 0, kept = 0;
    for (int i = 0; i < n; i++) total += c[i].prob;
    int last = n - 1;
    for (int i = 0; i < n; i++) {
        kept += c[i].prob;
        if (topp > 0 && topp < 1 && kept >= topp * total) {
            last = i;
            break;
        }
    }
    float r = coin * (last == n - 1 ? total : kept), cdf = 0;
    for (int i = 0; i <= last; i++) {
        cdf += c[i].prob;
        if (r < cdf) return c[i].index;
    }
    return c[last].index;
}

static int sampler_init(Sampler *s, int vocab_size, float temperature, float topp, int topk, uint64_t seed) {
    *s = (Sampler){vocab_size, temperature, topp, topk, seed ? seed : 0x9E3779B97F4A7C15ull, NULL};
    if (!(temperature >= 0) || !isfinite(temperature)) return fail("temperature must be >= 0, got %g", temperature);
    if (!(topp >= 0 && topp <= 1)) return fail("top-p must be in [0, 1], got %g", topp);
    if (topk < 0) return fail("top-k must be >= 0, got %d", topk);
    s->candidates = alloc_zeroed(vocab_size, sizeof(ProbIndex));
    return s->candidates ? 0 : -1;
}

static void sampler_free(Sampler *s) { free(s->candidates); }

// Picks the next token from logits (which it overwrites with probabilities); -1 if a logit is NaN
// or infinite (broken weights), which no rule can sample from.
static int sample(Sampler *s, float *logits) {
    int n = s->vocab_size;
    for (int i = 0; i < n; i++)
        if (!isfinite(logits[i])) return fail("the logits hold NaN or Inf (token %d): the model's weights are broken", i);
    if (s->temperature == 0) return argmax(logits, n);
    float max = logits[argmax(logits, n)];
    for (int i = 0; i < n; i++) logits[i] = (logits[i] - max) / s->temperature; // <= 0: no overflow at tiny temperatures
    softmax(logits, n);
    float coin = random_f32(&s->rng_state);
    int count;
    if (s->topk > 0 && s->topk < n) count = top_k(logits, n, s->topk, s->candidates);
    else if (s->topp > 0 && s->topp < 1) count = top_p_candidates(logits, n, s->topp, s->candidates);
    else {
        float cdf = 0;
        for (int i = 0; i < n; i++) if (coin < (cdf += logits[i])) return i;
        return n - 1;
    }
    return sample_sorted(s->candidates, count, s->topp, coin);
}

// ----------------------------------------------------------------------------
// Sessions: a single sequence's cache, tokens and sampler saved to a file, and restored
//
// The file: a SessionHeader, then the payload: the token at each row the cache holds (rows int32),
// then for each layer, each kv head, each row, the key's stored bytes and the value's (in the
// cache's types; a row in a sink slot as CACHE_SINK_TYPE). Little-endian, as x86-64 and ARM64 write
// it. A file from another model, cache type, rotation, block size or window, a truncated or changed
// one (the checksum), or one from a newer version is refused with one line. Written to a temporary
// file in the same folder, flushed to disk, then renamed over the old one: a crash leaves the old.

#define SESSION_MAGIC "kvcsess"     // the file's first 8 bytes, NUL included
#define SESSION_VERSION 1
#define FINGERPRINT_SAMPLE 65536     // bytes of the checkpoint hashed at its start, middle and end

typedef struct {
    char magic[8];                   // SESSION_MAGIC
    uint32_t version;                // SESSION_VERSION
    uint32_t header_bytes;           // sizeof(SessionHeader): 112
    uint64_t model;                  // the checkpoint's fingerprint (model_fingerprint)
    int32_t type_k, type_v, rotate;  // the cache's CacheSpec
    int32_t block_size, window, sinks; // its blocks and window (0: none)
    int32_t rows;                    // rows the cache holds (positions, or with a window sinks' block + window's)
    int32_t recent;                  // positions in the window
    int64_t length;                  // tokens the sequence has run: its next position
    int32_t sink_row;                // row 0 lies in its block's sink slot (iq4_nl)
    int32_t has_sampler;             // rng_state is the sampler's
    uint64_t rng_state;              // the sampler's random state after the last token it drew
    uint64_t payload_bytes;          // bytes after the header
    uint64_t checksum;               // FNV-1a of the payload
    uint8_t reserved[16];            // zero
} SessionHeader;
_Static_assert(sizeof(SessionHeader) == 112, "SessionHeader has no padding");

// A fingerprint of the checkpoint: its size and config, and its bytes at the start, the middle and
// the end (hashing all of a large file at every turn would take seconds).
static uint64_t model_fingerprint(const Model *m) {
    size_t n = m->map_size < FINGERPRINT_SAMPLE ? m->map_size : FINGERPRINT_SAMPLE;
    const char *map = m->map;
    uint64_t h = hash_pair(m->map_size) ^ hash_bytes((const char *)&m->config, (int)sizeof m->config);
    size_t at[3] = {0, (m->map_size - n) / 2, m->map_size - n};
    for (int i = 0; i < 3; i++) h = hash_pair(h) ^ hash_bytes(map + at[i], (int)n);
    return h;
}

// The header a sequence of m would write now (payload and checksum left 0).
static SessionHeader session_header(const Model *m, const Sequence *seq) {
    const KVCache *c = &seq->cache;
    const KVPool *pool = c->pool;
    SessionHeader h = {0};
    memcpy(h.magic, SESSION_MAGIC, sizeof h.magic);
    h.version = SESSION_VERSION;
    h.header_bytes = sizeof h;
    h.model = model_fingerprint(m);
    h.type_k = pool->spec.type_k, h.type_v = pool->spec.type_v, h.rotate = pool->spec.rotate;
    h.block_size = pool->block_size, h.window = c->window, h.sinks = c->sinks;
    h.length = seq->len;
    h.recent = c->recent;
    h.rows = held_rows(seq);
    h.sink_row = h.rows > 0 && cache_in_sink(c, 0);
    return h;
}

// Bytes of one (layer, kv head, row)'s key and value rows as the cache stores them.
static size_t session_row_bytes(const KVCache *c, int row) {
    size_t bytes = 0;
    for (int value = 0; value < 2; value++) {
        int type;
        cache_slot(c, value, 0, 0, row, &type);
        bytes += row_bytes(type, c->pool->head_dim);
    }
    return bytes;
}

static size_t session_payload_bytes(const KVCache *c, int rows) {
    size_t bytes = (size_t)rows * sizeof(int32_t);
    for (int row = 0; row < rows; row++) bytes += (size_t)c->pool->n_layers * c->pool->n_kv_heads * session_row_bytes(c, row);
    return bytes;
}

// The payload's rows copied out of (save) or into (load) the cache; `at` walks the buffer.
static void session_rows(KVCache *c, int rows, uint8_t *at, int load) {
    const KVPool *pool = c->pool;
    if (load) memcpy(c->tokens, at, (size_t)rows * sizeof(int32_t));
    else memcpy(at, c->tokens, (size_t)rows * sizeof(int32_t));
    at += (size_t)rows * sizeof(int32_t);
    for (int l = 0; l < pool->n_layers; l++)
        for (int h = 0; h < pool->n_kv_heads; h++)
            for (int row = 0; row < rows; row++)
                for (int value = 0; value < 2; value++) {
                    int type;
                    uint8_t *slot = cache_slot(c, value, l, h, row, &type);
                    size_t bytes = row_bytes(type, pool->head_dim);
                    if (load) memcpy(slot, at, bytes);
                    else memcpy(at, slot, bytes);
                    at += bytes;
                }
}

#define CHECKSUM_PIECE (INT_MAX / 2) // bytes hashed at once (hash_bytes takes an int): about 1 GiB

// A payload's checksum: FNV-1a of each CHECKSUM_PIECE, chained through hash_pair.
static uint64_t session_checksum(const uint8_t *payload, uint64_t bytes) {
    uint64_t h = hash_bytes((const char *)payload, 0);
    for (uint64_t done = 0; done < bytes; done += CHECKSUM_PIECE) {
        uint64_t n = bytes - done < CHECKSUM_PIECE ? bytes - done : CHECKSUM_PIECE;
        h = hash_pair(h) ^ hash_bytes((const char *)payload + done, (int)n);
    }
    return h;
}

// Writes the sequence (and the sampler's state, when given) to path, atomically.
static int session_save(const Model *m, Sequence *seq, const Sampler *sampler, const char *path) {
    if (seq->device || seq->cache.h2o_budget) return fail("a sequence on a device or with H2O is not saved to a session file");
    SessionHeader h = session_header(m, seq);
    h.has_sampler = sampler != NULL;
    h.rng_state = sampler ? sampler->rng_state : 0;
    h.payload_bytes = session_payload_bytes(&seq->cache, h.rows);
    uint8_t *payload = malloc(h.payload_bytes ? h.payload_bytes : 1);
    if (!payload) return fail("out of memory for a session of %llu bytes", (unsigned long long)h.payload_bytes);
    session_rows(&seq->cache, h.rows, payload, 0);
    h.checksum = session_checksum(payload, h.payload_bytes);
    size_t len = strlen(path);
    char *tmp = malloc(len + 16);
    if (!tmp) {
        free(payload);
        return fail("out of memory");
    }
    snprintf(tmp, len + 16, "%s.tmp.XXXXXX", path);
    int fd = mkstemp(tmp), rc = -1;
    if (fd < 0) fail("cannot write session %s: %s", path, strerror(errno));
    else {
        FILE *f = fdopen(fd, "wb");
        int ok = f && fwrite(&h, sizeof h, 1, f) == 1 && fwrite(payload, 1, h.payload_bytes, f) == h.payload_bytes &&
                 fflush(f) == 0 && fsync(fileno(f)) == 0;
        int closed = f ? fclose(f) == 0 : close(fd) == 0;
        if (!ok || !closed || rename(tmp, path)) {
            fail("cannot write session %s: %s", path, strerror(errno ? errno : EIO));
            unlink(tmp);
        } else rc = 0;
    }
    free(tmp);
    free(payload);
    return rc;
}

// Restores a session written by session_save into the sequence (made with the same model, cache
// types, rotation and window) and, when given and saved, the sampler's state.
static int session_load(const Model *m, Sequence *seq, Sampler *sampler, const char *path) {
    if (seq->device || seq->cache.h2o_budget) return fail("a sequence on a device or with H2O is not restored from a session file");
    if (!seq->own_pool && seq->len) return fail("a session is restored into an empty pooled sequence");
    size_t size;
    uint8_t *map = map_file(path, "session", &size);
    if (!map) return -1;
    SessionHeader h, want = session_header(m, seq);
    int rc = -1;
    memcpy(&h, map, size < sizeof h ? size : sizeof h);
    if (size < sizeof h || memcmp(h.magic, SESSION_MAGIC, sizeof h.magic))
        fail("%s is not a kvc session file (or is truncated)", path);
    else if (h.version > SESSION_VERSION || h.header_bytes != sizeof h)
        fail("%s was written by a newer kvc (session version %u); this one reads version %d", path, h.version, SESSION_VERSION);
    else if (h.model != want.model)
        fail("%s was saved with another model", path);
    else if (h.type_k != want.type_k || h.type_v != want.type_v || h.rotate != want.rotate)
        fail("%s was saved with cache types %s/%s%s, this sequence has %s/%s%s", path, CACHE_TYPES[h.type_k % N_CACHE_TYPES].name,
             CACHE_TYPES[h.type_v % N_CACHE_TYPES].name, h.rotate ? " rotated" : "", CACHE_TYPES[want.type_k].name,
             CACHE_TYPES[want.type_v].name, want.rotate ? " rotated" : "");
    else if (h.block_size != want.block_size || h.window != want.window || h.sinks != want.sinks)
        fail("%s was saved with blocks of %d, a window of %d and %d sinks; this sequence has %d, %d and %d", path, h.block_size,
             h.window, h.sinks, want.block_size, want.window, want.sinks);
    else if (h.rows < 0 || h.rows > seq->cache.capacity || h.length < h.rows || h.length > INT_MAX || h.recent < 0 ||
             h.recent > h.window || (!h.window && (h.length != h.rows || h.recent)) || h.sink_row < 0 || h.sink_row > 1)
        fail("%s is corrupt: %d rows of %lld tokens do not fit this sequence's cache of %d", path, h.rows,
             (long long)h.length, seq->cache.capacity);
    else if (h.payload_bytes != size - sizeof h)
        fail("%s is truncated or has bytes after its end: %llu payload bytes, %zu in the file", path,
             (unsigned long long)h.payload_bytes, size - sizeof h);
    else if (session_checksum(map + sizeof h, h.payload_bytes) != h.checksum)
        fail("%s is corrupt: its checksum does not match", path);
    else
        rc = 0;
    if (rc == 0 && !seq->own_pool && check_blocks(seq->cache.pool, (h.rows + h.block_size - 1) / h.block_size)) // own pools have room
        rc = -2;
    if (rc == 0) {
        KVCache *c = &seq->cache;
        if (c->window) cache_truncate(c, c->recent = 0);
        cache_reserve(c, 0, h.rows); // blocks for a window or a pooled sequence; row 0 to its sink slot where the type has one
        if (session_payload_bytes(c, h.rows) != h.payload_bytes || (h.rows && cache_in_sink(c, 0) != h.sink_row)) {
            rc = fail("%s is corrupt: its rows are not this cache's size", path);
            if (c->window || !seq->own_pool) cache_truncate(c, 0);
            seq->len = 0;
        } else {
            session_rows(c, h.rows, map + sizeof h, 1);
            for (int i = 0; i < h.rows; i++)
                if (c->tokens[i] < 0 || c->tokens[i] >= m->config.vocab_size) c->tokens[i] = 0; // only recorded, never run
            c->recent = h.recent;
            seq->len = (int)h.length;
            if (sampler && h.has_sampler) sampler->rng_state = h.rng_state;
            if (!c->window) cache_register(c, seq->len); // a pooled sequence's full blocks join the prefix cache
        }
    }
    munmap(map, size);
    return rc;
}

// ----------------------------------------------------------------------------
// Backends: the seam a GPU build implements. A sequence made on a device (kvc_sequence_new_on,
// --device) hands its forward passes and its cache to a backend (backend.h): run.c describes the
// model to it (its hyperparameters and each tensor in host memory) and keeps everything else:
// tokens, sampling, the CLI. The backend is found through a weak symbol that only the CUDA builds
// define (cuda.cu: `make cuda` on the GPU, `make cuda-sim` on the CPU); NULL in this build alone.
// The API functions that touch a sequence's cache or forward pass pass a device sequence on here.

#include "backend.h"

extern const Backend kvc_cuda_backend __attribute__((weak));

_Static_assert((int)BACKEND_WEIGHT_Q8_0 == WEIGHT_Q8_0 && (int)BACKEND_WEIGHT_Q4_1 == WEIGHT_Q4_1, "backend.h numbers weights as run.c");
_Static_assert((int)BACKEND_CACHE_F16 == CACHE_F16 && (int)BACKEND_CACHE_Q8_0 == CACHE_Q8_0 && (int)BACKEND_CACHE_IQ4_NL == CACHE_IQ4_NL &&
               BACKEND_CACHE_GROUP == CACHE_GROUP, "backend.h numbers cache types as run.c");

// A sequence's side on a device: the backend's own sequence (weights, cache, scratch live there).
struct DeviceSequence {
    const Backend *backend;
    BackendSequence *handle;
};

// The device a sequence runs on when none is named: this build's backend, else the CPU.
static const char *default_device(void) { return &kvc_cuda_backend ? kvc_cuda_backend.name : "cpu"; }

// One weight tensor of `layers` matrices (rows x cols) as the backend takes it.
static BackendMatrix backend_matrix(Matrix w, int layers, int rows, int cols) {
    return (BackendMatrix){w.type, WEIGHT_TYPE_NAMES[w.type], layers, rows, cols, w.type == WEIGHT_F32 ? 0 : w.group_size,
                           w.type == WEIGHT_F32 ? (const void *)w.f : w.type == WEIGHT_Q8_0 ? (const void *)w.q : (const void *)w.q4,
                           w.type == WEIGHT_Q8_0 ? w.scale : NULL};
}

static BackendModel backend_model(const Model *m) {
    const Config *p = &m->config;
    const Weights *w = &m->weights;
    int L = p->n_layers, dim = p->dim, hid = p->hidden_dim, qd = q_dim(p), kvd = kv_dim(p);
    return (BackendModel){p->dim, p->hidden_dim, L, p->n_heads, p->n_kv_heads, p->head_dim, p->vocab_size, p->rope_theta, p->norm_eps,
                          backend_matrix(w->tok_embeddings, 1, p->vocab_size, dim),
                          backend_matrix(w->wq, L, qd, dim), backend_matrix(w->wk, L, kvd, dim), backend_matrix(w->wv, L, kvd, dim),
                          backend_matrix(w->wo, L, dim, qd), backend_matrix(w->w1, L, hid, dim), backend_matrix(w->w2, L, dim, hid),
                          backend_matrix(w->w3, L, hid, dim), backend_matrix(w->wcls, 1, p->vocab_size, dim),
                          w->rms_att, w->rms_ffn, w->rms_final};
}

// A sequence on the device called `device` ("cpu", or this build's backend), else as kvc_sequence_new.
// A device sequence fills in the fields the CLI and the API read (its context, cache spec and a
// host copy of the last logits); its CPU cache and scratch stay empty.
static Sequence *device_sequence_new(const Model *m, const char *device, int context, int type_k, int type_v, int rotate) {
    if (!&kvc_cuda_backend) {
        fail("this build has no %s backend (build run_cuda / libkvc_cuda.so with `make cuda`, or the CPU simulation with `make cuda-sim`)", device);
        return NULL;
    }
    if (strcmp(device, kvc_cuda_backend.name)) {
        fail("unknown device %s: this build runs on cpu or %s", device, kvc_cuda_backend.name);
        return NULL;
    }
    if (context < 0 || context > m->config.seq_len) {
        fail("context %d is outside the model's 1..%d", context, m->config.seq_len);
        return NULL;
    }
    CacheSpec spec = cache_spec(type_k, type_v, rotate, m->config.head_dim);
    if (cache_spec_check(&spec, m->config.head_dim)) return NULL;
    Sequence *seq = calloc(1, sizeof *seq);
    Pool *pool = calloc(1, sizeof *pool); // the host side: the cache's spec, the last logits, no blocks
    struct DeviceSequence *dev = calloc(1, sizeof *dev);
    float *logits = calloc(m->config.vocab_size, sizeof(float));
    BackendModel bm = backend_model(m);
    int capacity = context ? context : m->config.seq_len, centered = spec.type_k == CACHE_IQ4_NL && m->weights.key_mean;
    BackendCache bc = {capacity, spec.type_k, spec.type_v, CACHE_TYPES[spec.type_k].name, CACHE_TYPES[spec.type_v].name, spec.rotate, centered};
    char error[BACKEND_ERROR_BYTES] = "out of memory";
    if (!seq || !pool || !dev || !logits || !(dev->handle = kvc_cuda_backend.open(&bm, &bc, error))) {
        fail("%s", error);
        free(seq), free(pool), free(dev), free(logits);
        return NULL;
    }
    dev->backend = &kvc_cuda_backend;
    pool->cache.spec = spec;
    pool->cache.n_layers = m->config.n_layers;
    pool->state.threads = 1;
    pool->state.logits = logits; // freed with the pool's scratch
    seq->device = dev;
    seq->pool = pool;
    seq->own_pool = 1;
    seq->cache.pool = &pool->cache;
    seq->cache.capacity = capacity;
    return seq;
}

// forward() on a device, after its checks: the backend's pass.
static int device_forward(const Model *m, Sequence *seq, const int *tokens, int n, int pos, float *out) {
    (void)m;
    char error[BACKEND_ERROR_BYTES];
    if (seq->device->backend->forward(seq->device->handle, tokens, n, pos, out, seq->pool->state.logits, error)) return fail("%s", error);
    seq->len = pos + n;
    return 0;
}

static int device_cache_read(const Sequence *seq, int layer, int pos, int n, float *keys, float *values) {
    char error[BACKEND_ERROR_BYTES];
    return seq->device->backend->cache_read(seq->device->handle, layer, pos, n, keys, values, error) ? fail("%s", error) : 0;
}

static void device_cache_reset(Sequence *seq, float fill) {
    char error[BACKEND_ERROR_BYTES];
    if (seq->device->backend->cache_reset(seq->device->handle, fill, error)) fail("%s", error);
}

// kvc_memory on a device: out[1] the device's KV cache, out[2] its weights and scratch.
static void device_memory(const Sequence *seq, unsigned long long out[3]) {
    unsigned long long device[3];
    seq->device->backend->memory(seq->device->handle, device);
    out[1] = device[1];
    out[2] = device[0] + device[2];
}

Sequence *kvc_sequence_new(const Model *m, int context, int threads, int type_k, int type_v, int rotate);

// kvc_sequence_new on a device: "cpu" (threads as there), or this build's backend (threads unused);
// NULL: this build's default (its backend, else the CPU).
Sequence *kvc_sequence_new_on(const Model *m, const char *device, int context, int threads, int type_k, int type_v, int rotate) {
    if (!device) device = default_device();
    if (!strcmp(device, "cpu")) return kvc_sequence_new(m, context, threads, type_k, type_v, rotate);
    return device_sequence_new(m, device, context, type_k, type_v, rotate);
}

static void device_sequence_free(Sequence *seq) {
    seq->device->backend->free(seq->device->handle);
    free(seq->device);
    seq->device = NULL;
}

// ----------------------------------------------------------------------------
// Library API (libkvc.so): what the Python binding calls. Errors return -1 / NULL and leave a
// message for kvc_last_error().

// A model: weights, tokenizer and chat template, read-only once open (tokenizer: a llama2.c
// tokenizer.bin, or NULL). Any number of sequences can run on it.
Model *kvc_open(const char *checkpoint, const char *tokenizer) {
    Model *m = malloc(sizeof *m);
    if (!m) {
        fail("out of memory");
        return NULL;
    }
    if (model_open(m, checkpoint, tokenizer)) {
        free(m);
        return NULL;
    }
    return m;
}

void kvc_close(Model *m) {
    if (!m) return;
    model_close(m);
    free(m);
}

const Config *kvc_config(const Model *m) { return &m->config; }

int kvc_has_tokenizer(const Model *m) { return m->has_tokenizer; }

// A sequence on m with a KV cache of its own of `context` positions (0: the model's), keys and
// values stored as type_k and type_v (kvc_cache_type), rotated or not (rotate -1: for a 4-bit type
// when head_dim is a power of two), and scratch for `threads` threads (0: all cores). Its blocks
// lie in order, so slot = position. Free it (kvc_sequence_free) before its model.
Sequence *kvc_sequence_new(const Model *m, int context, int threads, int type_k, int type_v, int rotate) {
    CacheSpec spec = cache_spec(type_k, type_v, rotate, m->config.head_dim);
    return sequence_alone(m, context, threads, &spec, 0, 0);
}

// A sequence as kvc_sequence_new makes, but holding at most `budget` positions: the last `recent`
// and those that drew the most attention so far (H2O: see cache_evict), each turned by RoPE by its
// own position (so it stops at the model's context). Not with a cache type that keeps position 0
// apart (iq4_nl).
Sequence *kvc_sequence_new_h2o(const Model *m, int budget, int recent, int threads, int type_k, int type_v, int rotate) {
    CacheSpec spec = cache_spec(type_k, type_v, rotate, m->config.head_dim);
    if (budget < 2 || budget > m->config.seq_len || recent < 0 || recent >= budget) {
        fail("H2O keeps a budget of 2..%d positions (the model's context), more than its recent ones: got %d and %d",
             m->config.seq_len, budget, recent);
        return NULL;
    }
    if (cache_has_sink(spec.type_k) || cache_has_sink(spec.type_v)) {
        fail("H2O moves rows, and an iq4_nl cache keeps position 0 apart: use another cache type");
        return NULL;
    }
    Sequence *seq = sequence_alone(m, budget, threads, &spec, 0, 0);
    if (!seq) return NULL;
    KVCache *c = &seq->cache;
    c->h2o_budget = budget;
    c->h2o_recent = recent;
    c->h2o_context = m->config.seq_len;
    c->h2o_position = alloc_zeroed(budget, sizeof(int));
    c->h2o_score = alloc_zeroed(budget, sizeof(double));
    if (!c->h2o_position || !c->h2o_score) {
        sequence_delete(seq);
        return NULL;
    }
    return seq;
}

// A sequence as kvc_sequence_new makes, but bounded: it keeps its first `sinks` positions and its
// last `window` (a multiple of 16) and runs on past the model's context, RoPE turning each position
// by its place inside the cache (StreamingLLM).
Sequence *kvc_sequence_new_window(const Model *m, int window, int sinks, int threads, int type_k, int type_v, int rotate) {
    CacheSpec spec = cache_spec(type_k, type_v, rotate, m->config.head_dim);
    if (window < 1) {
        fail("a window holds at least one block of %d positions, got %d", BLOCK_SIZE, window);
        return NULL;
    }
    return sequence_alone(m, 0, threads, &spec, window, sinks);
}

// Lets go of the sequence's blocks (a pool of its own is freed with it), or its device's side.
void kvc_sequence_free(Sequence *seq) {
    if (seq && seq->device) device_sequence_free(seq);
    sequence_delete(seq);
}

// Positions the sequence can hold, and how many it holds.
int kvc_context(const Sequence *seq) { return seq->cache.capacity; }
int kvc_length(const Sequence *seq) { return seq->len; }

// The cache type called `name` ("f32", "f16", "bf16", "q8_0", "q4_0", "iq4_nl"), or -1.
int kvc_cache_type(const char *name) { return cache_type_by_name(name); }

// Bytes in use, from the engine's own accounting: out[0] the mapped checkpoint (weights, tokenizer),
// out[1] the KV cache of the sequence's pool (its own, or the one it shares), out[2] the pool's
// scratch (activations).
void kvc_memory(const Model *m, const Sequence *seq, unsigned long long out[3]) {
    const KVPool *c = &seq->pool->cache;
    out[0] = m->map_size;
    out[1] = (unsigned long long)cache_bytes(&m->config, &c->spec, c->slots, c->sink_blocks);
    out[2] = seq->pool->state.bytes;
    if (seq->device) device_memory(seq, out);
}

// How the sequence's pool used its threads: out[0] the threads it was given, out[1] the team its
// next forward block runs on (fewer while another process holds a core: see Governor), out[2] the
// forward blocks it has run and out[3] how many of them ran on fewer threads than out[0].
void kvc_threads(const Sequence *seq, long long out[4]) {
    const RunState *s = &seq->pool->state;
    out[0] = s->threads;
    out[1] = s->governor.team;
    out[2] = s->governor.blocks;
    out[3] = s->governor.reduced;
}

// Whether the sequence's cache rotates its heads (after the default was resolved).
int kvc_cache_rotates(const Sequence *seq) { return seq->pool->cache.spec.rotate; }

// Runs tokens at positions pos.. (filling the cache); logits (n x vocab) of every position, or NULL.
// A sequence in a shared pool takes pos <= its length (positions from pos on are replaced).
int kvc_forward(const Model *m, Sequence *seq, const int *tokens, int n, int pos, float *logits) {
    return forward(m, seq, tokens, n, pos, logits);
}

// The last forwarded token's logits (vocab), owned by the sequence's pool (kvc_forward's only).
float *kvc_logits(Sequence *seq) { return seq->pool->state.logits; }

// Copies positions pos..pos+n-1 of a layer's cache out as float32, keys and values (n, kv_dim) each.
int kvc_cache_read(const Sequence *seq, int layer, int pos, int n, float *keys, float *values) {
    const KVCache *c = &seq->cache;
    if (seq->device) {
        if (layer < 0 || layer >= c->pool->n_layers || n < 0 || pos < 0 || pos > c->capacity || n > c->capacity - pos)
            return fail("layer %d, positions %d..%d are outside the cache", layer, pos, pos + n - 1);
        return device_cache_read(seq, layer, pos, n, keys, values);
    }
    int held = c->n_table * c->pool->block_size < c->capacity ? c->n_table * c->pool->block_size : c->capacity;
    if (layer < 0 || layer >= c->pool->n_layers) return fail("layer %d is outside 0..%d", layer, c->pool->n_layers - 1);
    if (n < 0 || pos < 0 || pos > held || n > held - pos)
        return fail("positions %d..%d are outside the %d the sequence's blocks hold", pos, pos + n - 1, held);
    cache_read(c, layer, pos, n, keys, values);
    return 0;
}

// The storage of keys (which 0) or values (1) of a sequence with a pool of its own,
// (n_layers, n_kv_heads, context, head_dim) values of its type, when that is a plain array of f32
// or f16 values (not rotated); else NULL. It stays valid until kvc_sequence_free.
const void *kvc_cache_data(const Sequence *seq, int which) {
    const KVPool *c = &seq->pool->cache;
    int type = which ? c->spec.type_v : c->spec.type_k;
    if ((type != CACHE_F32 && type != CACHE_F16) || c->spec.rotate || !seq->own_pool || seq->cache.window) return NULL;
    return which ? c->values : c->keys;
}

// Empties a sequence with a pool of its own; every cache slot is set to `fill` (0, or NaN so that a
// stray read shows).
int kvc_cache_reset(Sequence *seq, float fill) {
    if (!seq->own_pool) return fail("a pooled sequence is emptied with kvc_truncate(seq, 0)");
    if (seq->cache.window) cache_truncate(&seq->cache, seq->cache.recent = 0);
    seq->cache.h2o_rows = 0;
    if (seq->device) device_cache_reset(seq, fill);
    else pool_fill(&seq->pool->cache, fill);
    seq->len = 0;
    return 0;
}

// Saves a sequence, its cache in its stored types, and the sampler's state (NULL: none) to path,
// atomically; kvc_session_load restores it into a sequence made the same way (refusing anything
// else with one line), or into an empty sequence of a pool of the same cache types and block size,
// whose full blocks then join the prefix cache (-2: the pool has too few blocks). kvc_tokens copies out the tokens at the rows the cache holds
// (capacity of them at most; out may be NULL to ask) and returns how many there are.
int kvc_session_save(const Model *m, Sequence *seq, const Sampler *sampler, const char *path) {
    return session_save(m, seq, sampler, path);
}
int kvc_session_load(const Model *m, Sequence *seq, Sampler *sampler, const char *path) {
    return session_load(m, seq, sampler, path);
}
// Copies the first n ints of `from` to out (capacity of them at most; out NULL: none) and returns n:
// how the kvc_ calls below hand a sequence's arrays out.
static int ints_out(int *out, int capacity, const int *from, int n) {
    if (out && capacity > 0 && n > 0) memcpy(out, from, (size_t)(n < capacity ? n : capacity) * sizeof(int));
    return n;
}
int kvc_tokens(const Sequence *seq, int *out, int capacity) {
    return ints_out(out, capacity, seq->cache.tokens, seq->device ? 0 : held_rows(seq));
}

// ---- Pools: many sequences sharing KV blocks, run together a step at a time

// A pool for m of n_blocks blocks of block_size positions each (0: BLOCK_SIZE), stored as type_k
// / type_v (rotate as in kvc_sequence_new), with scratch for `threads` threads (0: all cores).
// Sequences in it hold up to the model's seq_len positions. Full blocks are registered for reuse
// (kvc_reuse_prefix). Free its sequences, then the pool, then the model.
Pool *kvc_pool_new(const Model *m, int n_blocks, int block_size, int threads, int type_k, int type_v, int rotate) {
    if (block_size == 0) block_size = BLOCK_SIZE;
    if (block_size < 1 || block_size > m->config.seq_len) {
        fail("block size %d is outside 1..%d (the model's context)", block_size, m->config.seq_len);
        return NULL;
    }
    if (n_blocks < 1 || (long long)n_blocks * block_size > INT_MAX) {
        fail("a pool needs 1..%d blocks of %d positions, got %d", INT_MAX / block_size, block_size, n_blocks);
        return NULL;
    }
    CacheSpec spec = cache_spec(type_k, type_v, rotate, m->config.head_dim);
    return pool_new(m, &spec, n_blocks, block_size, n_blocks * block_size, n_blocks, 1, threads, m->config.seq_len);
}

void kvc_pool_free(Pool *pool) { pool_delete(pool); }

// Bytes one block takes (keys and values of every layer, with its sink slots).
unsigned long long kvc_block_bytes(const Model *m, int block_size, int type_k, int type_v, int rotate) {
    CacheSpec spec = cache_spec(type_k, type_v, rotate, m->config.head_dim);
    if (block_size == 0) block_size = BLOCK_SIZE;
    return (unsigned long long)cache_bytes(&m->config, &spec, block_size, 1);
}

// The pool's books: out[0] blocks, out[1] held by a sequence, out[2] cached (unreferenced, holding
// a registered prefix block), out[3] free, out[4] positions taken from the prefix cache so far,
// out[5] positions per block.
void kvc_pool_stats(const Pool *pool, long long out[6]) {
    const KVPool *c = &pool->cache;
    out[0] = c->n_blocks;
    out[1] = c->n_blocks - c->n_free - c->n_cached;
    out[2] = c->n_cached;
    out[3] = c->n_free;
    out[4] = c->prefix_hits;
    out[5] = c->block_size;
}

// With `on`, every block freed from now on (and every free block now) is filled with NaN, so that a
// read of a position no sequence wrote shows.
void kvc_pool_poison(Pool *pool, int on) {
    KVPool *c = &pool->cache;
    c->poison = on != 0;
    for (int i = 0; on && i < c->n_free; i++) block_fill(c, c->free_list[i], NAN);
}

// An empty sequence in the pool.
Sequence *kvc_pool_sequence(Pool *pool) { return sequence_new(pool, pool->state.capacity, 0); }

// An empty sequence in the pool that keeps its first `sinks` positions and its last `window` (a
// multiple of the pool's block size) and runs on past the model's context (kvc_sequence_new_window);
// each step it takes at most kvc_step_room tokens.
Sequence *kvc_pool_sequence_window(Pool *pool, int window, int sinks) {
    int sink_rows = window_sink_rows(window, sinks, pool->cache.block_size, pool->state.capacity);
    if (sink_rows < 0) return NULL;
    Sequence *seq = sequence_new(pool, sink_rows + window, 0);
    if (!seq) return NULL;
    seq->cache.window = window;
    seq->cache.sinks = sinks;
    seq->cache.sink_rows = sink_rows;
    return seq;
}

// Tokens the sequence can take in its next kvc_step.
int kvc_step_room(const Sequence *seq) { return step_room(seq); }

// Copies out the pool blocks the sequence's block table holds, in position order (capacity of them at
// most; out may be NULL to ask), and returns how many there are.
int kvc_block_table(const Sequence *seq, int *out, int capacity) {
    return ints_out(out, capacity, seq->cache.table, seq->device ? 0 : seq->cache.n_table);
}

// A new sequence holding what seq holds, sharing every block (copied when either writes into it).
Sequence *kvc_fork(Sequence *seq) {
    if (seq->own_pool) {
        fail("only pooled sequences fork");
        return NULL;
    }
    Sequence *child = alloc_zeroed(1, sizeof *child);
    if (!child) return NULL;
    if (cache_fork(&child->cache, &seq->cache)) {
        cache_free(&child->cache);
        free(child);
        return NULL;
    }
    child->pool = seq->pool;
    child->len = seq->len;
    return child;
}

// Keeps positions 0..len-1 (len <= the sequence's length); the blocks after them go back. A windowed
// sequence only empties (len 0).
int kvc_truncate(Sequence *seq, int len) {
    if (len < 0 || len > seq->len) return fail("cannot truncate a sequence of %d positions to %d", seq->len, len);
    if (seq->cache.window && len) return fail("a windowed sequence is not truncated, only emptied (to 0)");
    if (seq->cache.window) seq->cache.recent = 0;
    if (!seq->own_pool) cache_truncate(&seq->cache, len);
    seq->len = len;
    return 0;
}

// For an empty pooled sequence: takes the cached blocks that hold the first positions of tokens (n
// of them), leaving at least one to run. Returns the positions taken (then its length).
int kvc_reuse_prefix(Sequence *seq, const int *tokens, int n) {
    if (seq->own_pool || seq->len) return fail("only an empty pooled sequence takes a cached prefix");
    if (seq->cache.window) return 0; // its rows are not the dense cache's: nothing to share
    return seq->len = cache_reuse_prefix(&seq->cache, tokens, n);
}

// New blocks appending n tokens to seq would take now (copies of shared blocks included; a full
// window's next block counted, though moving the window gives one back first).
int kvc_blocks_needed(const Sequence *seq, int n) {
    const KVCache *c = &seq->cache;
    if (c->window && seq->len >= c->sinks && c->recent == c->window) return n > 0 ? (n + c->pool->block_size - 1) / c->pool->block_size : 0;
    return cache_blocks_needed(c, next_row(seq), n);
}

// One step: sequence i of seqs (n of them, all in pool, each once) takes counts[i] tokens, one
// sequence's after another in tokens, at its end; logits (n x vocab) gets each sequence's last
// token's. -2 when the pool has too few blocks (nothing changed), -1 on other errors.
int kvc_step(const Model *m, Pool *pool, Sequence **seqs, const int *counts, const int *tokens, int n, float *logits) {
    return step(m, pool, seqs, counts, tokens, n, logits);
}

// Text -> token ids; with `special`, spelled-out control tokens become their ids (else text is text).
int kvc_encode(const Model *m, const char *text, int add_bos, int special, int *out, int capacity) {
    if (!m->has_tokenizer) return fail("this model has no tokenizer");
    size_t len = strlen(text);
    if ((size_t)capacity < encode_capacity(len)) return fail("encode needs room for %zu ids", encode_capacity(len));
    return encode(&m->tokenizer, text, len, add_bos, special, NULL, 0, out);
}

int kvc_encode_capacity(int text_bytes) { return (int)encode_capacity((size_t)text_bytes); }

// The bytes token decodes to after prev (-1 at the start of a text); returns their length.
int kvc_token_text(const Model *m, int prev, int token, const char **text) {
    if (!m->has_tokenizer) return fail("this model has no tokenizer");
    if (token < 0 || token >= m->config.vocab_size) return fail("token id %d is outside the vocab", token);
    int len;
    *text = token_text(&m->tokenizer, prev, token, &len);
    return len;
}

// Text of n token ids into out (room for capacity bytes). Returns the text's length; when the text
// may not fit, nothing is written and it returns the room to ask again with (the sum of the tokens'
// texts: at least the length, which can be shorter by the dummy prefix's space).
int kvc_decode(const Model *m, const int *ids, int n, char *out, int capacity) {
    if (!m->has_tokenizer) return fail("this model has no tokenizer");
    size_t need = 0;
    for (int i = 0; i < n; i++) {
        if (ids[i] < 0 || ids[i] >= m->config.vocab_size) return fail("token id %d is outside the vocab", ids[i]);
        need += m->tokenizer.text_len[ids[i]];
    }
    if (need > INT_MAX) return fail("the text of %d tokens is too long", n);
    return need > (size_t)capacity ? (int)need : (int)decode(&m->tokenizer, ids, n, out);
}

// The binding's parallel arrays of roles and contents as Messages (malloc'd), or NULL.
static Message *messages_from(const char **roles, const char **contents, int n) {
    Message *msg = malloc((n > 0 ? n : 1) * sizeof(Message));
    if (!msg) fail("out of memory");
    for (int i = 0; msg && i < n; i++) msg[i] = (Message){roles[i], contents[i]};
    return msg;
}

// A conversation rendered with the model's chat template and encoded; *ids must be freed with kvc_free.
int kvc_chat_encode(const Model *m, const char **roles, const char **contents, int n, int start,
                    int generation_prompt, int **ids) {
    if (!m->has_tokenizer) return fail("this model has no tokenizer");
    Message *msg = messages_from(roles, contents, n);
    int count = msg ? chat_encode(&m->chat, &m->tokenizer, msg, n, start, generation_prompt, "", ids) : -1;
    free(msg);
    return count;
}

// The same conversation as text, with special tokens spelled out; *text must be freed with kvc_free.
int kvc_chat_render(const Model *m, const char **roles, const char **contents, int n, int generation_prompt,
                    char **text) {
    if (!m->has_tokenizer) return fail("this model has no tokenizer");
    Message *msg = messages_from(roles, contents, n);
    Text out = {0};
    int ok = msg && text_add(&out, "") == 0 && chat_render(&m->chat, &m->tokenizer, &out, msg, n, 1, generation_prompt) == 0; // "": never NULL
    free(msg);
    free(out.user); // the caller gets the string alone
    if (!ok) free(out.s);
    *text = ok ? out.s : NULL;
    return ok ? (int)out.len : -1;
}

int kvc_chat_style(const Model *m) { return m->chat.style; }
int kvc_end_of_turn(const Model *m) { return m->chat.end_of_turn; }
void kvc_free(void *p) { free(p); }

Sampler *kvc_sampler_new(int vocab_size, float temperature, float topp, int topk, unsigned long long seed) {
    Sampler *s = malloc(sizeof *s);
    if (!s) {
        fail("out of memory");
        return NULL;
    }
    if (sampler_init(s, vocab_size, temperature, topp, topk, seed)) {
        sampler_free(s);
        free(s);
        return NULL;
    }
    return s;
}

void kvc_sampler_free(Sampler *s) {
    if (!s) return;
    sampler_free(s);
    free(s);
}

// Samples from logits (vocab_size of them, overwritten); -1 if they hold NaN or Inf.
int kvc_sample(Sampler *s, float *logits) { return sample(s, logits); }

// ----------------------------------------------------------------------------
// Command-line program, and the generation loop that streams its text
#ifndef KVC_LIBRARY

// What follows an assistant's end-of-turn token before the next message (ChatML ends lines).
static const char *chat_after_reply(const ChatTemplate *chat) { return chat->style == CHAT_CHATML ? "\n" : ""; }


typedef struct { char pending[4]; int n; } Utf8Stream; // holds a character split across tokens

static int utf8_expected(uint8_t lead) {
    return lead < 0x80 ? 1 : (lead >> 5) == 6 ? 2 : (lead >> 4) == 14 ? 3 : (lead >> 3) == 30 ? 4 : 1;
}

static void stream_write(Utf8Stream *u, const char *s, int len) {
    for (int i = 0; i < len; i++) {
        uint8_t c = (uint8_t)s[i];
        if (u->n > 0 && (c & 0xC0) != 0x80) { // broken sequence: let it out as it is
            fwrite(u->pending, 1, u->n, stdout);
            u->n = 0;
        }
        u->pending[u->n++] = (char)c;
        if (u->n >= utf8_expected((uint8_t)u->pending[0])) {
            fwrite(u->pending, 1, u->n, stdout);
            u->n = 0;
        }
    }
    fflush(stdout);
}

static void stream_flush(Utf8Stream *u) {
    fwrite(u->pending, 1, u->n, stdout);
    u->n = 0;
    fflush(stdout);
}

typedef struct {
    int prompt_tokens, generated_tokens;
    double prefill_seconds, decode_seconds;
    int stop_token;  // the token that ended the reply, -1 if max_tokens or the context ended it
    int last_token;  // the last token generated (not yet in the cache), -1 if none
} GenerationStats;

// Positions a sequence can run: a windowed one as long as positions count, an H2O one the model's
// context, any other its cache's.
static int positions_limit(const Sequence *seq) {
    return seq->cache.window ? INT_MAX : seq->cache.h2o_budget ? seq->cache.h2o_context : seq->cache.capacity;
}

static int room_left(const Sequence *seq) { return positions_limit(seq) - seq->len; }

// Feeds `prompt` after what the sequence holds, then samples up to max_tokens, streaming text,
// until `stop` (or eos). The stop token is sampled but not fed: the caller decides what follows it.
// Without use_cache (the prompt must start the sequence), each new token recomputes the whole
// sequence from position 0, as a transformer without a KV cache does: the cost the cache saves.
static int generate_from(const Model *m, Sequence *seq, Sampler *sampler, const int *prompt, int n_prompt,
                         int max_tokens, int stop, int use_cache, GenerationStats *stats) {
    const Config *p = &m->config;
    *stats = (GenerationStats){n_prompt, 0, 0, 0, -1, -1};
    int *history = use_cache ? NULL : malloc(((size_t)n_prompt + max_tokens) * sizeof(int));
    if (!use_cache && !history) return fail("out of memory");
    if (history) memcpy(history, prompt, n_prompt * sizeof(int));
    int rc = -1;
    Utf8Stream out = {0};
    double start = clock_seconds(CLOCK_MONOTONIC);
    if (forward(m, seq, prompt, n_prompt, seq->len, NULL)) goto done;
    stats->prefill_seconds = clock_seconds(CLOCK_MONOTONIC) - start;
    start = clock_seconds(CLOCK_MONOTONIC);
    int prev = n_prompt > 0 ? prompt[n_prompt - 1] : -1;
    for (int i = 0; i < max_tokens; i++) {
        int next = sample(sampler, seq->pool->state.logits);
        if (next < 0) goto done;
        if (next == stop || next == p->eos_id) {
            stats->stop_token = next;
            break;
        }
        int len;
        const char *piece = token_text(&m->tokenizer, prev, next, &len);
        stream_write(&out, piece, len);
        stats->generated_tokens++;
        stats->last_token = next;
        prev = next;
        if (room_left(seq) <= 0 || i + 1 == max_tokens) break; // nothing will read its logits
        if (history) history[seq->len] = next;
        if (history ? forward(m, seq, history, seq->len + 1, 0, NULL) : forward(m, seq, &next, 1, seq->len, NULL))
            goto done;
        stats->last_token = -1;
    }
    rc = 0;
done:
    stream_flush(&out);
    stats->decode_seconds = clock_seconds(CLOCK_MONOTONIC) - start;
    free(history);
    return rc;
}

// The speed line; and, when the governor ran blocks on fewer threads (so far in the sequence), how many.
static void print_stats(const GenerationStats *s, const Sequence *seq) {
    fprintf(stderr, "prompt %d tokens, %.1f tok/s | generated %d tokens, %.1f tok/s\n", s->prompt_tokens,
            s->prefill_seconds > 0 ? s->prompt_tokens / s->prefill_seconds : 0.0, s->generated_tokens,
            s->decode_seconds > 0 ? s->generated_tokens / s->decode_seconds : 0.0);
    const Governor *g = &seq->pool->state.governor;
    if (g->reduced)
        fprintf(stderr, "threads: %ld of %ld forward blocks ran on fewer than %d threads (another process was using a core)\n",
                g->reduced, g->blocks, seq->pool->state.threads);
}

static void usage(FILE *f) {
    fprintf(f,
            "usage: run <checkpoint> [options]\n"
            "example: ./run model.bin -n 256 -i \"Once upon a time\"\n"
            "options:\n"
            "  -t <float>  temperature in [0,inf), default 1.0 (0: greedy)\n"
            "  -p <float>  top-p (nucleus) in [0,1], default 0.9 (1: off)\n"
            "  -k <int>    top-k, default 0 (off)\n"
            "  -s <int>    random seed, default time(NULL)\n"
            "  -n <int>    tokens to generate, default 256 (0: up to the context)\n"
            "  -i <string> input prompt\n"
            "  -z <string> tokenizer.bin for llama2.c checkpoints\n"
            "  -m <string> mode: generate|chat, default generate\n"
            "  -y <string> system prompt in chat mode (default: the model's own)\n"
            "  -c <int>    context length (KV cache size), default the model's\n"
            "  --window <int>  keep only the last N positions (a multiple of 16) and run on past the context\n"
            "  --sinks <int>   with --window: also keep the first S positions (attention sinks), default 4\n"
            "  --session <file>  chat: resume the chat saved in file (when it exists), save it after each turn\n"
            "  --h2o <int>     keep at most N positions: the --recent R last (default N/2) and the heavy hitters\n"
            "  -j <int>    threads (1..%d), default all cores\n"
            "  -ctk, --cache-type-k <type>  KV cache keys: f32 (default), f16, bf16, q8_0, q4_0, iq4_nl\n"
            "  -ctv, --cache-type-v <type>  KV cache values, the same types\n"
            "  --cache-rotate on|off        Hadamard-rotate each head before storing (default: on for q4_0 and iq4_nl, head_dim a power of 2)\n"
            "  --no-cache                   recompute the whole sequence for every token (what the cache saves)\n"
            "  --device cpu|cuda|cuda-sim   where the forward pass runs (this build: %s by default)\n"
            "  -h          this help\n", MAX_THREADS, default_device());
}

// The checkpoint is mapped, not read: if another program truncates or rewrites it in place while
// this one runs, the next read of a vanished page raises SIGBUS. Say so in one line instead of dying
// silently (replacing the file atomically, as kvc's exporter does, is always safe).
static void on_sigbus(int sig) {
    static const char message[] = "error: the checkpoint file was truncated or overwritten while in use "
                                  "(replace model files atomically: write elsewhere, then rename)\n";
    (void)sig;
    ssize_t ignored = write(STDERR_FILENO, message, sizeof message - 1); // async-signal-safe, unlike stdio
    (void)ignored;
    _exit(1);
}

static void die(const char *message) {
    fprintf(stderr, "error: %s\n", message);
    exit(1);
}

static void bad_usage(const char *fmt, const char *arg) {
    fprintf(stderr, "error: ");
    fprintf(stderr, fmt, arg);
    fprintf(stderr, "\n");
    usage(stderr);
    exit(1);
}

static long parse_long(const char *flag, const char *s, long min, long max) {
    char *end;
    errno = 0;
    long v = strtol(s, &end, 10);
    if (errno || end == s || *end || v < min || v > max) bad_usage("bad value for %s", flag);
    return v;
}

static float parse_float(const char *flag, const char *s) {
    char *end;
    float v = strtof(s, &end);
    if (end == s || *end || !isfinite(v)) bad_usage("bad value for %s", flag);
    return v;
}

// Long flags, as llama.cpp's users know them, each standing for a code of the switch in main.
static const struct { const char *name; char code; } LONG_FLAGS[] = {
    {"-ctk", 'K'}, {"--cache-type-k", 'K'}, {"-ctv", 'V'}, {"--cache-type-v", 'V'}, {"--cache-rotate", 'R'},
    {"--window", 'W'}, {"--sinks", 'S'}, {"--session", 'F'}, {"--h2o", 'H'}, {"--recent", 'r'},
    {"--device", 'D'},
};

static int parse_cache_type(const char *flag, const char *s) {
    int type = cache_type_by_name(s);
    if (type < 0) bad_usage("bad value for %s (f32|f16|bf16|q8_0|q4_0|iq4_nl)", flag);
    return type;
}

static int cli_generate(const Model *m, Sequence *seq, Sampler *sampler, const char *prompt, int steps, int use_cache) {
    int context = positions_limit(seq);
    size_t len = strlen(prompt);
    int *ids = malloc(encode_capacity(len) * sizeof(int));
    if (!ids) return fail("out of memory");
    int n = encode(&m->tokenizer, prompt, len, 1, 0, NULL, 0, ids); // what the user typed is text
    if (n == 0) fail("nothing to start from: give a prompt with -i");
    else if (n >= context) fail("the prompt is %d tokens but the context holds %d", n, context);
    if (n <= 0 || n >= context) {
        free(ids);
        return -1;
    }
    int room = context - n + 1; // the last token sampled needs no cache slot
    if (steps <= 0 || steps > room) {
        if (steps > room) fprintf(stderr, "note: -n %d is more than the context leaves (%d); generating up to %d\n", steps, room, room);
        steps = room;
    }
    fwrite(prompt, 1, len, stdout);
    GenerationStats stats;
    int rc = generate_from(m, seq, sampler, ids, n, steps, -1, use_cache, &stats);
    free(ids);
    if (rc) return -1;
    printf("\n");
    print_stats(&stats, seq);
    return 0;
}

// Context shift (llama.cpp's, by whole turns): before a message that would leave its reply less
// than `reply` positions, drop the oldest turns after the system prompt (everything up to the
// first end-of-turn token: the system message in ChatML, the first exchange where the system prompt
// sits in the first user message), at turn boundaries starts[0..*n_starts), and run the turns kept
// again at their new positions. Says what it did on stderr. Returns whether it dropped anything.
static int context_shift(const Model *m, Sequence *seq, int stop, int *starts, int *n_starts, int count, int reply) {
    KVCache *c = &seq->cache;
    int keep = 0;
    while (keep < seq->len && c->tokens[keep] != stop) keep++;
    if (keep++ >= seq->len) return 0; // no end of turn yet: nothing is a whole turn
    int first = 0;
    while (first < *n_starts && (starts[first] < keep || seq->len - starts[first] + keep + count + reply > c->capacity)) first++;
    if (first == *n_starts) return 0;
    int from = starts[first], kept = seq->len - from, dropped = from - keep;
    int *tokens = malloc((size_t)(kept > 0 ? kept : 1) * sizeof(int));
    if (!tokens) return 0;
    memcpy(tokens, c->tokens + from, (size_t)kept * sizeof(int));
    int ok = forward(m, seq, tokens, kept, keep, NULL) == 0;
    free(tokens);
    if (!ok) return 0;
    for (int i = first; i < *n_starts; i++) starts[i - first] = starts[i] - dropped;
    *n_starts -= first;
    fprintf(stderr, "\n[context shift: dropped the oldest %d tokens, kept the system prompt (%d tokens) and the last %d, "
            "run again at their new positions]\n", dropped, keep, kept);
    return 1;
}

// Multi-turn chat: each turn adds only its new tokens to the KV cache. When the context fills, the
// oldest turns go (context_shift). With a session file, a chat saved there goes on where it
// stopped, and each turn is saved when it ends.
static int cli_chat(const Model *m, Sequence *seq, Sampler *sampler, const char *system, int steps, const char *session) {
    if (m->chat.style == CHAT_NONE) return fail("this model has no chat template (use -m generate)");
    int turn = 0, rc = 0;
    int stop = m->chat.end_of_turn >= 0 ? m->chat.end_of_turn : m->config.eos_id;
    char *line = NULL;
    size_t cap = 0;
    const char *glue = ""; // what the template puts between the last reply's end and the next message
    int *starts = malloc((size_t)seq->cache.capacity * sizeof(int)), n_starts = 0; // where each turn began
    int reply = steps > 0 && steps < seq->cache.capacity / 2 ? steps + 2 : seq->cache.capacity / 4; // room a reply should have
    if (!starts) return fail("out of memory");
    if (session && access(session, F_OK) == 0) {
        if (session_load(m, seq, sampler, session)) {
            free(starts);
            return -1;
        }
        fprintf(stderr, "[session %s: resumed a chat of %d tokens]\n", session, seq->len);
        turn = 1; // the system prompt and the first turn's start are in the cache
        glue = chat_after_reply(&m->chat);
    }
    for (;; turn++) {
        printf("User: ");
        fflush(stdout);
        ssize_t got = getline(&line, &cap, stdin);
        if (got < 0) { // EOF / Ctrl-D
            printf("\n");
            break;
        }
        while (got > 0 && (line[got - 1] == '\n' || line[got - 1] == '\r')) line[--got] = 0;
        if (got == 0) {
            turn--;
            continue;
        }
        Message msg[2];
        int n = 0;
        if (turn == 0 && system) msg[n++] = (Message){"system", system};
        msg[n++] = (Message){"user", line};
        int *ids, count = chat_encode(&m->chat, &m->tokenizer, msg, n, turn == 0, 1, glue, &ids);
        if ((rc = count < 0 ? -1 : 0)) break;
        if (!seq->cache.window && !seq->cache.h2o_budget && count + reply > room_left(seq)) context_shift(m, seq, stop, starts, &n_starts, count, reply);
        int cached = seq->len;
        starts[n_starts++] = cached;
        if (count > room_left(seq) - 1) {
            free(ids);
            fprintf(stderr, "\n[context full: %d of %d tokens used, and this message is %d tokens. Start a new chat.]\n",
                    cached, seq->cache.capacity, count);
            break;
        }
        printf("Assistant: ");
        GenerationStats stats;
        int room = room_left(seq) - count, max = steps > 0 && steps < room ? steps : room;
        rc = generate_from(m, seq, sampler, ids, count, max, stop, 1, &stats);
        free(ids);
        if (rc) break;
        printf("\n");
        fflush(stdout); // the turn's stats go to stderr after the reply, even when stdout is a pipe
        // a reply cut short has its last token still to feed; then the template's end-of-turn token
        int tail[2], n_tail = 0;
        if (stats.last_token >= 0) tail[n_tail++] = stats.last_token;
        if (stop >= 0) tail[n_tail++] = stop;
        fprintf(stderr, "[turn %d: %d new prompt tokens processed, %d cached] ", turn + 1, stats.prompt_tokens, cached);
        print_stats(&stats, seq);
        if (n_tail > room_left(seq)) {
            fprintf(stderr, "[context full: %d tokens. Start a new chat.]\n", seq->cache.capacity);
            break;
        }
        if ((rc = forward(m, seq, tail, n_tail, seq->len, NULL))) break;
        if (session && (rc = session_save(m, seq, sampler, session))) break;
        glue = chat_after_reply(&m->chat);
    }
    free(line);
    free(starts);
    return rc;
}

int main(int argc, char **argv) {
    const char *checkpoint = NULL, *tokenizer = NULL, *prompt = "", *mode = "generate", *system = NULL, *session = NULL;
    float temperature = 1.0f, topp = 0.9f;
    int topk = 0, steps = 256, context = 0, threads = 0, type_k = CACHE_F32, type_v = CACHE_F32, rotate = -1;
    int use_cache = 1, window = 0, sinks = -1, h2o = 0, recent = -1;
    const char *device = default_device();
    unsigned long long seed = 0;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "-h") || !strcmp(a, "--help")) {
            usage(stdout);
            return 0;
        }
        if (a[0] != '-') {
            if (checkpoint) bad_usage("unexpected argument %s", a);
            checkpoint = a;
            continue;
        }
        if (!strcmp(a, "--no-cache")) { // the one flag without a value
            use_cache = 0;
            continue;
        }
        char code = strlen(a) == 2 && strchr("tpksnizmycj", a[1]) ? a[1] : 0;
        for (size_t f = 0; !code && f < sizeof LONG_FLAGS / sizeof LONG_FLAGS[0]; f++)
            if (!strcmp(a, LONG_FLAGS[f].name)) code = LONG_FLAGS[f].code;
        if (!code) bad_usage("unknown flag %s", a);
        if (i + 1 >= argc) bad_usage("flag %s needs a value", a);
        const char *v = argv[++i];
        switch (code) {
        case 'K': type_k = parse_cache_type(a, v); break;
        case 'V': type_v = parse_cache_type(a, v); break;
        case 'R':
            if (strcmp(v, "on") && strcmp(v, "off")) bad_usage("%s takes on or off", a);
            rotate = !strcmp(v, "on");
            break;
        case 't': temperature = parse_float(a, v); break;
        case 'p': topp = parse_float(a, v); break;
        case 'k': topk = (int)parse_long(a, v, 0, INT32_MAX); break;
        case 's': seed = (unsigned long long)parse_long(a, v, 0, LONG_MAX); break;
        case 'n': steps = (int)parse_long(a, v, 0, INT32_MAX); break;
        case 'i': prompt = v; break;
        case 'z': tokenizer = v; break;
        case 'm': mode = v; break;
        case 'y': system = v; break;
        case 'c': context = (int)parse_long(a, v, 1, INT32_MAX); break;
        case 'j': threads = (int)parse_long(a, v, 1, MAX_THREADS); break;
        case 'W': window = (int)parse_long(a, v, 1, INT32_MAX); break;
        case 'F': session = v; break;
        case 'H': h2o = (int)parse_long(a, v, 2, INT32_MAX); break;
        case 'r': recent = (int)parse_long(a, v, 0, INT32_MAX); break;
        case 'S': sinks = (int)parse_long(a, v, 0, INT32_MAX); break;
        case 'D': device = v; break;
        }
    }
    if (!checkpoint) bad_usage("%s", "no checkpoint given");
    if (strcmp(mode, "generate") && strcmp(mode, "chat")) bad_usage("unknown mode %s (generate|chat)", mode);
    if (!use_cache && !strcmp(mode, "chat")) bad_usage("%s", "--no-cache works with -m generate only");
    if (temperature < 0) bad_usage("%s", "temperature must be >= 0");
    if (topp < 0 || topp > 1) bad_usage("%s", "top-p must be in [0, 1]");
    if (sinks >= 0 && !window) bad_usage("%s", "--sinks needs --window");
    if (session && strcmp(mode, "chat")) bad_usage("%s", "--session works with -m chat");
    if (window && context) bad_usage("%s", "-c and --window: a windowed cache holds its sinks and window");
    if (window && !use_cache) bad_usage("%s", "--window needs the cache (not --no-cache)");
    if (recent >= 0 && !h2o) bad_usage("%s", "--recent needs --h2o");
    if (h2o && (window || context || !use_cache)) bad_usage("%s", "--h2o keeps its own budget: not with --window, -c or --no-cache");
    if (!seed) seed = (unsigned long long)time(NULL);
    signal(SIGBUS, on_sigbus);

    Model *m = kvc_open(checkpoint, tokenizer);
    if (!m) die(kvc_last_error());
    if (!m->has_tokenizer) die("this checkpoint has no tokenizer: give one with -z tokenizer.bin");
    if ((window || h2o) && strcmp(device, "cpu")) bad_usage("%s", "--window and --h2o run on the CPU only (--device cpu)");
    Sequence *seq = window ? kvc_sequence_new_window(m, window, sinks < 0 ? DEFAULT_SINKS : sinks, threads, type_k, type_v, rotate)
                    : h2o  ? kvc_sequence_new_h2o(m, h2o, recent < 0 ? h2o / 2 : recent, threads, type_k, type_v, rotate)
                           : kvc_sequence_new_on(m, device, context, threads, type_k, type_v, rotate);
    if (!seq) die(kvc_last_error());
    if (seq->pool->cache.spec.type_k == CACHE_IQ4_NL && !m->weights.key_mean)
        fprintf(stderr, "note: %s has no key_mean, so iq4_nl keys are stored uncentered, at a cost in quality "
                "(python -m export measures one)\n", checkpoint);
    Sampler sampler;
    if (sampler_init(&sampler, m->config.vocab_size, temperature, topp, topk, seed)) die(kvc_last_error());
    error_message[0] = 0;
    int rc = !strcmp(mode, "chat") ? cli_chat(m, seq, &sampler, system, steps, session)
                                   : cli_generate(m, seq, &sampler, prompt, steps, use_cache);
    sampler_free(&sampler);
    kvc_sequence_free(seq);
    kvc_close(m);
    if (rc) die(kvc_last_error());
    return 0;
}
#endif
