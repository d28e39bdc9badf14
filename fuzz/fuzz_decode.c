// libFuzzer target: kvc_decode and kvc_token_text on arbitrary token ids with fuzz/seeds.py's
// models. The first byte picks the model, the second the room given to kvc_decode first; then
// each 4 bytes are an id: mostly folded into 0..vocab (vocab itself is one past the end), and
// when either of the top two bits is set, taken as they are (negative, huge).
#define _GNU_SOURCE
#define KVC_LIBRARY
#define mmap fuzz_mmap
#define munmap fuzz_munmap
#include "../run.c"
#define FUZZ_WITH_MODELS
#include "fuzz.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (size < 2) return 0;
    const Model *m = fuzz_models[data[0] % FUZZ_N_MODELS];
    int vocab = kvc_config(m)->vocab_size, room = data[1];
    int n = (int)((size - 2) / 4), valid = 1;
    int *ids = malloc((n ? n : 1) * sizeof(int));
    FUZZ_CHECK(ids);
    for (int i = 0; i < n; i++) {
        uint32_t v;
        memcpy(&v, data + 2 + 4 * i, 4);
        ids[i] = v >> 30 ? (int)v : (int)(v % (uint32_t)(vocab + 1));
        valid &= ids[i] >= 0 && ids[i] < vocab;
    }
    char *out = malloc(room ? room : 1); // exactly the room given: ASan sees any write past it
    FUZZ_CHECK(out);
    int len = kvc_decode(m, ids, n, out, room);
    FUZZ_CHECK(valid ? len >= 0 : len == -1);
    if (len > room) { // too little room: nothing written, ask again with the room it asked for
        free(out);
        out = malloc(len);
        int asked = len;
        len = out ? kvc_decode(m, ids, n, out, asked) : -1;
        FUZZ_CHECK(len >= 0 && len <= asked); // enough (the room asked for is an upper bound)
    }
    // token by token, each after its predecessor, the pieces concatenate to at least the same bytes
    // (decode may drop leading spaces token_text keeps)
    size_t total = 0;
    for (int i = 0; i < n; i++) {
        const char *text = NULL;
        int k = kvc_token_text(m, i ? ids[i - 1] : -1, ids[i], &text);
        FUZZ_CHECK(ids[i] >= 0 && ids[i] < vocab ? k >= 0 && text : k == -1);
        if (k > 0) {
            volatile char sink = text[0] ^ text[k - 1]; // ASan checks the claimed extent
            (void)sink;
            total += (size_t)k;
        }
    }
    FUZZ_CHECK(!valid || (size_t)len <= total);
    free(out);
    free(ids);
    return 0;
}
