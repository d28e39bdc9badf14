// libFuzzer target: kvc_encode on arbitrary text with small real tokenizers (fuzz/seeds.py's
// models: sentencepiece BPE and byte-level BPE under each pre-tokenizer). The first byte picks
// the model, whether special tokens spelled in the text are parsed (bit 7) and BOS (bit 6); the
// rest, up to a NUL, is the text. The ids must lie in the vocab and fit encode's room, and
// byte-level BPE without special-token parsing must decode back to exactly the text.
#define _GNU_SOURCE
#define KVC_LIBRARY
#define mmap fuzz_mmap
#define munmap fuzz_munmap
#include "../run.c"
#define FUZZ_WITH_MODELS
#include "fuzz.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (size < 1) return 0;
    int which = (data[0] & 63) % FUZZ_N_MODELS, byte_level = which >= 2; // see FUZZ_MODEL_NAMES
    const Model *m = fuzz_models[which];
    int special = data[0] >> 7 & 1, add_bos = data[0] >> 6 & 1;
    char *text = fuzz_strndup(data + 1, size - 1);
    int len = (int)strlen(text), cap = kvc_encode_capacity(len);
    int *ids = malloc(cap * sizeof(int)); // exactly the room asked for: ASan sees any write past it
    FUZZ_CHECK(ids);
    int n = kvc_encode(m, text, add_bos, special, ids, cap);
    FUZZ_CHECK(n >= 0 && n <= cap);
    int vocab = kvc_config(m)->vocab_size;
    for (int i = 0; i < n; i++) FUZZ_CHECK(ids[i] >= 0 && ids[i] < vocab);
    FUZZ_CHECK(cap < 1 || kvc_encode(m, text, add_bos, special, ids, cap - 1) == -1); // too little room: refused
    n = kvc_encode(m, text, add_bos, special, ids, cap);
    char probe;
    int need = kvc_decode(m, ids, n, &probe, 0);
    FUZZ_CHECK(need >= 0);
    char *out = malloc(need ? need : 1);
    int got = out ? kvc_decode(m, ids, n, out, need) : -1;
    FUZZ_CHECK(got >= 0 && got <= need); // what it asked for is enough (an upper bound)
    if (byte_level && !special && !add_bos)
        FUZZ_CHECK(got == len && !memcmp(out, text, len));
    free(out);
    free(ids);
    free(text);
    return 0;
}
