// libFuzzer target: the chat renderer and encoder (kvc_chat_render, kvc_chat_encode) with
// fuzz/seeds.py's models, whose templates are Llama 2 (sentencepiece), ChatML and Llama 3
// (byte-level BPE). The first byte picks the model and the flags: generation prompt (bit 7),
// start of the conversation (bit 6), one message given a NULL content (bit 5). The rest is
// role, content, role, content, ... separated by NUL bytes (at most 32 messages).
#define _GNU_SOURCE
#define KVC_LIBRARY
#define mmap fuzz_mmap
#define munmap fuzz_munmap
#include "../run.c"
#define FUZZ_WITH_MODELS
#include "fuzz.h"

#define MAX_MESSAGES 32

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (size < 1) return 0;
    const Model *m = fuzz_models[(data[0] & 31) % FUZZ_N_MODELS];
    int generation_prompt = data[0] >> 7 & 1, start = data[0] >> 6 & 1, null_content = data[0] >> 5 & 1;
    char *raw = malloc(size);
    FUZZ_CHECK(raw);
    memcpy(raw, data + 1, size - 1);
    raw[size - 1] = 0;
    const char *fields[2 * MAX_MESSAGES];
    int n_fields = 0;
    for (size_t i = 0; i < size && n_fields < 2 * MAX_MESSAGES;) {
        fields[n_fields++] = raw + i;
        i += strlen(raw + i) + 1;
    }
    int n = n_fields / 2;
    const char *roles[MAX_MESSAGES], *contents[MAX_MESSAGES];
    for (int i = 0; i < n; i++) roles[i] = fields[2 * i], contents[i] = fields[2 * i + 1];
    if (null_content && n > 0) contents[n - 1] = NULL;

    char *rendered = NULL;
    int len = kvc_chat_render(m, roles, contents, n, generation_prompt, &rendered);
    FUZZ_CHECK(null_content && n > 0 ? len == -1 && !rendered : len >= 0 && rendered && strlen(rendered) == (size_t)len);
    kvc_free(rendered);
    int *ids = NULL;
    int count = kvc_chat_encode(m, roles, contents, n, start, generation_prompt, &ids);
    FUZZ_CHECK(null_content && n > 0 ? count == -1 : count >= 0);
    int vocab = kvc_config(m)->vocab_size;
    for (int i = 0; i < count; i++) FUZZ_CHECK(ids[i] >= 0 && ids[i] < vocab);
    kvc_free(ids);
    free(raw);
    return 0;
}
