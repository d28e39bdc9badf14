// libFuzzer target: the checkpoint loader on arbitrary bytes (kvc files, llama2.c v0/v1/v2 files).
// A file that opens must also run: a sequence of a few positions with an f32 cache, a forward pass
// over two tokens then one more; then a sequence whose cache types and rotation come from the
// input's size (kvc files may carry trailing bytes), its forward pass and its cache read back; and,
// if the file carries a tokenizer, a little encoding and decoding.
#define _GNU_SOURCE
#define KVC_LIBRARY
#define mmap fuzz_mmap
#define munmap fuzz_munmap
#include "../run.c"
#include "fuzz.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    static MemFile file;
    memfile_write(&file, data, size);
    Model *m = kvc_open(file.path, NULL);
    if (!m) {
        FUZZ_CHECK(kvc_last_error()[0]); // a refusal always says why
        return 0;
    }
    const Config *c = kvc_config(m);
    int vocab = c->vocab_size;
    Sequence *seq = kvc_sequence_new(m, c->seq_len < 8 ? 0 : 8, 1, 0, 0, -1); // an f32 cache
    FUZZ_CHECK(seq);
    int context = kvc_context(seq);
    int tokens[3] = {0, vocab - 1, vocab / 2};
    float *logits = malloc(2 * (size_t)vocab * sizeof(float));
    FUZZ_CHECK(logits);
    int n = context < 2 ? context : 2;
    FUZZ_CHECK(kvc_forward(m, seq, tokens, n, 0, logits) == 0);
    if (n < context) FUZZ_CHECK(kvc_forward(m, seq, tokens + 2, 1, n, NULL) == 0);
    FUZZ_CHECK(kvc_forward(m, seq, tokens, 1, context, NULL) == -1); // past the context: refused
    tokens[0] = vocab;
    FUZZ_CHECK(kvc_forward(m, seq, tokens, 1, 0, NULL) == -1); // outside the vocab: refused
    free(logits);
    kvc_sequence_free(seq);

    int type_k = (int)(size % N_CACHE_TYPES), type_v = (int)(size / N_CACHE_TYPES % N_CACHE_TYPES); // kvc_cache_type's numbers
    int rotate = (int)(size / (N_CACHE_TYPES * N_CACHE_TYPES) % 3) - 1;
    seq = kvc_sequence_new(m, c->seq_len < 8 ? 0 : 8, 1, type_k, type_v, rotate);
    if (!seq) FUZZ_CHECK(kvc_last_error()[0]); // e.g. a 32-value group that does not divide head_dim
    else {
        n = kvc_context(seq) < 3 ? kvc_context(seq) : 3;
        tokens[0] = 0;
        FUZZ_CHECK(kvc_forward(m, seq, tokens, n, 0, NULL) == 0);
        size_t kv = (size_t)c->n_kv_heads * c->head_dim * n;
        float *keys = malloc((kv ? kv : 1) * sizeof(float)), *values = malloc((kv ? kv : 1) * sizeof(float));
        FUZZ_CHECK(keys && values);
        for (int layer = 0; layer < c->n_layers; layer++) FUZZ_CHECK(kvc_cache_read(seq, layer, 0, n, keys, values) == 0);
        free(keys);
        free(values);
        kvc_sequence_free(seq);
    }
    if (kvc_has_tokenizer(m)) {
        int ids[64];
        int count = kvc_encode(m, "hi <s> \xe2\x96\x81x 12", 1, 1, ids, 64);
        FUZZ_CHECK(count >= 0 && count <= 64);
        char text[256];
        int len = kvc_decode(m, ids, count, text, sizeof text);
        FUZZ_CHECK(len >= 0);
        const char *piece;
        for (int id = 0; id < vocab && id < 8; id++) FUZZ_CHECK(kvc_token_text(m, -1, id, &piece) >= 0);
    }
    kvc_close(m);
    return 0;
}
