/* What the fuzz targets share. Each target is one file that does

       #define _GNU_SOURCE
       #define KVC_LIBRARY
       #define mmap fuzz_mmap
       #define munmap fuzz_munmap
       #include "../run.c"
       #include "fuzz.h"

   and drives the engine only through its public kvc_* API, so the targets survive refactors of
   run.c's insides. The two defines swap run.c's mmap of a file (checkpoint, tokenizer.bin) for an
   exactly-sized malloc'd copy (fuzz_mmap below): a read past the end of a mapped file then stops
   AddressSanitizer instead of landing, unseen, in the zero-filled rest of the file's last page.

   Files the engine opens are memfds named by /proc/self/fd paths: nothing touches the disk. The
   encode, decode and chat targets define FUZZ_WITH_MODELS before including this file: they open the
   small real models that fuzz/seeds.py writes (fuzz_models[], in FUZZ_MODEL_NAMES order) at start,
   from $KVC_FUZZ_MODELS or else the folder `models` next to the target's binary. */
#include <sys/mman.h>
#include <sys/types.h>

#undef mmap
#undef munmap

// A file's "map": a malloc'd copy of exactly the file's bytes (run.c maps whole files read-only at
// offset 0, and unmaps them with the same size).
void *fuzz_mmap(void *addr, size_t len, int prot, int flags, int fd, off_t offset) {
    (void)addr, (void)prot, (void)flags;
    void *p = NULL;
    if (offset != 0 || posix_memalign(&p, 64, len ? len : 1)) return MAP_FAILED;
    for (size_t done = 0; done < len;) {
        ssize_t n = pread(fd, (char *)p + done, len - done, (off_t)done);
        if (n <= 0) {
            free(p);
            return MAP_FAILED;
        }
        done += (size_t)n;
    }
    return p;
}

int fuzz_munmap(void *addr, size_t len) {
    (void)len;
    free(addr);
    return 0;
}

// A memory file holding data[0..n), rewritten on every call; *path names it for open().
typedef struct {
    int fd;
    char path[64];
} MemFile;

static inline void memfile_write(MemFile *f, const void *data, size_t n) {
    if (f->fd <= 0) {
        f->fd = memfd_create("kvc-fuzz", 0);
        if (f->fd < 0) {
            perror("memfd_create");
            abort();
        }
        snprintf(f->path, sizeof f->path, "/proc/self/fd/%d", f->fd);
    }
    if (ftruncate(f->fd, 0)) abort();
    for (size_t done = 0; done < n;) {
        ssize_t w = pwrite(f->fd, (const char *)data + done, n - done, (off_t)done);
        if (w <= 0) abort();
        done += (size_t)w;
    }
}

// data as a NUL-terminated string (an embedded NUL ends it early).
static inline char *fuzz_strndup(const uint8_t *data, size_t n) {
    char *s = malloc(n + 1);
    if (!s) abort();
    memcpy(s, data, n);
    s[n] = 0;
    return s;
}

#define FUZZ_CHECK(cond)                                                                      \
    do {                                                                                      \
        if (!(cond)) {                                                                        \
            fprintf(stderr, "%s:%d: check failed: %s\n", __FILE__, __LINE__, #cond);          \
            abort();                                                                          \
        }                                                                                     \
    } while (0)

// ----------------------------------------------------------------------------
// The fixed models of the encode, decode and chat targets (fuzz/seeds.py writes them)

static const char *const FUZZ_MODEL_NAMES[] = {
    "sp.bin",      // sentencepiece BPE, byte fallback, Llama 2 template
    "sp_ws.bin",   // the same with remove_extra_whitespaces, Llama 2 template with a default system prompt
    "gpt2.bin",    // byte-level BPE, GPT-2 pre-tokenizer, ChatML
    "smollm.bin",  // byte-level BPE, SmolLM pre-tokenizer, ChatML with a default system prompt
    "llama3.bin",  // byte-level BPE, Llama 3 pre-tokenizer and ignore_merges, Llama 3 template
};
#define FUZZ_N_MODELS ((int)(sizeof FUZZ_MODEL_NAMES / sizeof FUZZ_MODEL_NAMES[0]))

static Model *fuzz_models[FUZZ_N_MODELS] __attribute__((unused));

static inline void fuzz_open_models(const char *argv0) {
    char dir[4096];
    const char *env = getenv("KVC_FUZZ_MODELS");
    if (env) snprintf(dir, sizeof dir, "%s", env);
    else {
        const char *slash = strrchr(argv0, '/');
        int len = slash ? (int)(slash - argv0) : 1;
        snprintf(dir, sizeof dir, "%.*s/models", len, slash ? argv0 : ".");
    }
    for (int i = 0; i < FUZZ_N_MODELS; i++) {
        char path[4200];
        snprintf(path, sizeof path, "%s/%s", dir, FUZZ_MODEL_NAMES[i]);
        if (!(fuzz_models[i] = kvc_open(path, NULL)) || !kvc_has_tokenizer(fuzz_models[i])) {
            fprintf(stderr, "cannot open %s (%s): run fuzz/seeds.py (make fuzz does) or set KVC_FUZZ_MODELS\n", path,
                    kvc_last_error());
            exit(1);
        }
    }
}

#ifdef FUZZ_WITH_MODELS
int LLVMFuzzerInitialize(int *argc, char ***argv) {
    (void)argc;
    fuzz_open_models((*argv)[0]);
    return 0;
}
#endif
