// libFuzzer target: the tokenizer readers. The first byte picks what the rest of the input is:
//   even: a kvc tokenizer section, put into a valid tiny kvc file (whose vocab is the section's
//         token count) with a chat template of style (byte >> 1) & 3;
//   odd:  a llama2.c tokenizer.bin for a valid tiny llama2.c v1 model whose vocab is 1 + the
//         second byte.
// A tokenizer that loads is then used: texts encoded (special tokens parsed and not), decoded,
// every token's text, and a conversation rendered and encoded.
#define _GNU_SOURCE
#define KVC_LIBRARY
#define mmap fuzz_mmap
#define munmap fuzz_munmap
#include "../run.c"
#include "fuzz.h"

// The tiny model around the tokenizer: dims small enough that its zero weights cost nothing.
enum { DIM = 8, HIDDEN = 16, LAYERS = 1, HEADS = 2, KV_HEADS = 1, HEAD_DIM = DIM / HEADS, SEQ_LEN = 8 };

typedef struct { uint8_t *p; size_t len, cap; } Buf;

static void put(Buf *b, const void *data, size_t n) {
    if (b->len + n > b->cap) {
        b->cap = (b->len + n) * 2;
        if (!(b->p = realloc(b->p, b->cap))) abort();
    }
    if (data) memcpy(b->p + b->len, data, n);
    else memset(b->p + b->len, 0, n);
    b->len += n;
}
static void put_i32(Buf *b, int32_t v) { put(b, &v, 4); } // little-endian hosts only, as run.c
static void put_f32(Buf *b, float v) { put(b, &v, 4); }
static void put_u64(Buf *b, uint64_t v) { put(b, &v, 8); }
static void pad_to(Buf *b, size_t align) { put(b, NULL, (align - b->len % align) % align); }

// The float counts of the weights, in kvc (embeddings first) order; llama2.c v1 puts the three
// norms first. Shared classifier.
static const size_t KVC_TENSORS[] = {
    0 /* tok_embeddings: vocab * DIM */, LAYERS * DIM, LAYERS * HEADS * HEAD_DIM * DIM, LAYERS * KV_HEADS * HEAD_DIM * DIM,
    LAYERS * KV_HEADS * HEAD_DIM * DIM, LAYERS * DIM * HEADS * HEAD_DIM, LAYERS * DIM, LAYERS * HIDDEN * DIM,
    LAYERS * DIM * HIDDEN, LAYERS * HIDDEN * DIM, DIM,
};
#define N_TENSORS (sizeof KVC_TENSORS / sizeof KVC_TENSORS[0])

// A kvc file: header, tokenizer section (the fuzzed bytes), chat section, zero f32 weights.
static void kvc_file(Buf *b, const uint8_t *tok, size_t tok_len, int vocab, int style) {
    static const char system[] = "Be brief.";
    b->len = 0;
    put(b, NULL, 256); // the header, filled in below
    size_t tok_off = b->len;
    put(b, tok, tok_len);
    pad_to(b, 64);
    size_t chat_off = b->len;
    put_i32(b, style);
    put_i32(b, style && vocab > 2 ? 2 : -1);
    put_i32(b, style == CHAT_LLAMA3 ? 0 : sizeof system - 1);
    put(b, system, style == CHAT_LLAMA3 ? 0 : sizeof system - 1);
    put_i32(b, 0); // no jinja
    size_t chat_len = b->len - chat_off;
    pad_to(b, 64);
    size_t w_off = b->len;
    for (size_t i = 0; i < N_TENSORS; i++) {
        pad_to(b, 64);
        put(b, NULL, (i ? KVC_TENSORS[i] : (size_t)vocab * DIM) * sizeof(float));
    }
    size_t w_len = b->len - w_off;
    Buf h = {0};
    put(&h, "KVCM", 4);
    put_i32(&h, KVC_VERSION);
    int32_t dims[] = {DIM, HIDDEN, LAYERS, HEADS, KV_HEADS, HEAD_DIM, vocab, SEQ_LEN};
    for (int i = 0; i < 8; i++) put_i32(&h, dims[i]);
    put_f32(&h, 10000.0f);
    put_f32(&h, 1e-5f);
    int32_t rest[] = {1 /* shared classifier */, vocab > 1 ? 1 : -1, vocab > 2 ? 2 : -1, 0};
    for (int i = 0; i < 4; i++) put_i32(&h, rest[i]);
    put_u64(&h, tok_off), put_u64(&h, tok_len), put_u64(&h, chat_off), put_u64(&h, chat_len);
    put_u64(&h, w_off), put_u64(&h, w_len);
    put(&h, NULL, sizeof(WeightTypes)); // every matrix f32, no q8_0 group
    memcpy(b->p, h.p, h.len);
    free(h.p);
}

// A llama2.c v1 file: 256-byte header, then zero f32 weights (norms first).
static void llama2c_file(Buf *b, int vocab) {
    b->len = 0;
    int32_t head[] = {0x616b3432, 1, DIM, HIDDEN, LAYERS, HEADS, KV_HEADS, vocab, SEQ_LEN};
    for (int i = 0; i < 9; i++) put_i32(b, head[i]);
    uint8_t shared = 1;
    put(b, &shared, 1);
    put(b, NULL, 256 - b->len);
    size_t floats = (size_t)vocab * DIM;
    for (size_t i = 1; i < N_TENSORS; i++) floats += KVC_TENSORS[i];
    put(b, NULL, floats * sizeof(float));
}

static const char *const TEXTS[] = {
    "Hello world", " leading  and   double spaces ", "<s>[INST] hi [/INST]</s>", "<|im_start|>user\nhi<|im_end|>",
    "x\xe2\x96\x81y \xe2\x96\x81", "I'm 12345 caf\xc3\xa9 \xf0\x9f\x98\x80", "\xff\xfe bad \xc3", "", " ", "\n\n\t",
};

static void use_tokenizer(Model *m) {
    int vocab = kvc_config(m)->vocab_size;
    for (size_t i = 0; i < sizeof TEXTS / sizeof TEXTS[0]; i++)
        for (int special = 0; special < 2; special++) {
            int cap = kvc_encode_capacity((int)strlen(TEXTS[i]));
            int *ids = malloc(cap * sizeof(int));
            FUZZ_CHECK(ids);
            int n = kvc_encode(m, TEXTS[i], 1, special, ids, cap);
            FUZZ_CHECK(n >= 0 && n <= cap);
            for (int k = 0; k < n; k++) FUZZ_CHECK(ids[k] >= 0 && ids[k] < vocab);
            char probe;
            int need = kvc_decode(m, ids, n, &probe, 0); // 0 bytes of room: asks for the length
            FUZZ_CHECK(need >= 0);
            char *text = malloc(need + 1);
            int len = text ? kvc_decode(m, ids, n, text, need) : -1;
            FUZZ_CHECK(len >= 0 && len <= need); // what it asked for is enough (an upper bound)
            free(text);
            free(ids);
        }
    for (int id = 0; id < vocab; id++) {
        const char *text;
        FUZZ_CHECK(kvc_token_text(m, id - 1, id, &text) >= 0);
    }
    const char *roles[] = {"system", "user", "assistant", "user"};
    const char *contents[] = {"Be kind.", " hi <s> ", "hello</s>", "<|im_end|> again"};
    char *rendered = NULL;
    int len = kvc_chat_render(m, roles, contents, 4, 1, &rendered);
    FUZZ_CHECK((len >= 0) == (kvc_chat_style(m) != 0));
    if (len >= 0) FUZZ_CHECK(rendered[len] == 0); // NUL-terminated (pieces it adds may hold NULs of their own)
    kvc_free(rendered);
    int *ids = NULL;
    int n = kvc_chat_encode(m, roles, contents, 4, 1, 1, &ids);
    FUZZ_CHECK((n >= 0) == (len >= 0));
    for (int k = 0; k < n; k++) FUZZ_CHECK(ids[k] >= 0 && ids[k] < vocab);
    kvc_free(ids);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    static MemFile model_file, tok_file;
    static Buf b;
    if (size < 2) return 0;
    Model *m;
    if (data[0] % 2 == 0) {
        uint32_t count = 0;
        if (size >= 9) memcpy(&count, data + 5, 4); // the section's token count
        int vocab = count >= 1 && count <= 4096 ? (int)count : 16;
        kvc_file(&b, data + 1, size - 1, vocab, (data[0] >> 1) & 3);
        memfile_write(&model_file, b.p, b.len);
        m = kvc_open(model_file.path, NULL);
    } else {
        llama2c_file(&b, 1 + data[1]);
        memfile_write(&model_file, b.p, b.len);
        memfile_write(&tok_file, data + 2, size - 2);
        m = kvc_open(model_file.path, tok_file.path);
    }
    if (!m) {
        FUZZ_CHECK(kvc_last_error()[0]);
        return 0;
    }
    if (kvc_has_tokenizer(m)) use_tokenizer(m);
    kvc_close(m);
    return 0;
}
