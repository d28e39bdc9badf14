/* backend.h: the seam between run.c's engine and a device backend (cuda.cu, built by `make cuda`
   for the GPU and by `make cuda-sim` for the CPU).

   run.c keeps the whole CPU engine: files, tokenizers, sampler, CLI, library API. A backend runs
   only the forward pass of one sequence: it takes the model's hyperparameters and a descriptor of
   every tensor in host memory (BackendModel, built by run.c from its Model), uploads them with a
   KV cache (BackendCache) at open, and then runs blocks of tokens, handing back logits. Sampling
   stays on the host. Every function that can fail returns -1 (open: NULL) with one line in `error`.

   Plain C, so that run.c (C) and cuda.cu (C++ / CUDA) share it. The numbering of weight and cache
   types is run.c's (run.c checks that at compile time).
*/
#ifndef KVC_BACKEND_H
#define KVC_BACKEND_H

#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif

enum { BACKEND_WEIGHT_F32 = 0, BACKEND_WEIGHT_Q8_0 = 1, BACKEND_WEIGHT_Q4_0 = 2, BACKEND_WEIGHT_Q4_1 = 3 };
enum { BACKEND_CACHE_F32 = 0, BACKEND_CACHE_F16 = 1, BACKEND_CACHE_BF16 = 2, BACKEND_CACHE_Q8_0 = 3,
       BACKEND_CACHE_Q4_0 = 4, BACKEND_CACHE_IQ4_NL = 5 };
#define BACKEND_CACHE_GROUP 32  // values per fp16 scale in a q8_0 cache block (run.c's CACHE_GROUP)
#define BACKEND_ERROR_BYTES 256 // room for a backend's one-line error message

// A weight tensor in host memory: `layers` matrices of rows x cols, row-major, one after another.
typedef struct {
    int type;              // BACKEND_WEIGHT_*
    const char *type_name; // "f32", "q8_0", ... for error messages
    int layers, rows, cols;
    int group_size;        // q8_0: values per scale along a row; 0 for f32
    const void *values;    // f32: float (layers, rows, cols); q8_0: int8 (layers, rows, cols)
    const float *scales;   // q8_0: (layers, rows, cols / group_size), x = q * scale; else NULL
} BackendMatrix;

// The model as the backend sees it: hyperparameters, and every tensor (still in host memory).
typedef struct {
    int dim, hidden_dim, n_layers, n_heads, n_kv_heads, head_dim, vocab_size;
    float rope_theta, norm_eps;
    BackendMatrix tok_embeddings;    // (1, vocab, dim)
    BackendMatrix wq, wk, wv, wo;    // (layers, n_heads * head_dim, dim), (layers, kv_dim, dim) x2, (layers, dim, q_dim)
    BackendMatrix w1, w2, w3;        // (layers, hidden, dim), (layers, dim, hidden), (layers, hidden, dim)
    BackendMatrix wcls;              // (1, vocab, dim): tok_embeddings' when the classifier is shared
    const float *rms_att, *rms_ffn;  // (layers, dim)
    const float *rms_final;          // (dim)
} BackendModel;

// The KV cache a sequence asks for. Stored as run.c stores it: (n_layers, n_kv_heads, context,
// head_dim) rows of each type, the same bytes (so a cache read compares bit for bit).
typedef struct {
    int context;                       // positions it holds
    int type_k, type_v;                // BACKEND_CACHE_*
    const char *type_k_name, *type_v_name;
    int rotate;                        // heads turned by a Hadamard rotation before storing
    int centered_keys;                 // keys stored less the model's key mean (iq4_nl)
} BackendCache;

typedef struct BackendSequence BackendSequence; // a backend's own sequence: weights, cache, scratch

typedef struct {
    const char *name; // the device it runs on, as --device and Python's device= name it
    // Uploads the model and allocates its cache (zeroed); NULL when the device refuses something
    // (a weight or cache type it lacks, no device, out of device memory).
    BackendSequence *(*open)(const BackendModel *m, const BackendCache *c, char *error);
    // Runs n tokens (ids checked by the caller) at positions pos.. (inside the context), writing
    // their keys and values into the cache. Logits: every token's into all_logits (n x vocab) when
    // it is not NULL, and the last token's into last (vocab) always.
    int (*forward)(BackendSequence *s, const int *tokens, int n, int pos, float *all_logits, float *last, char *error);
    // Copies positions pos..pos+n-1 of a layer's cache as float32, keys and values (n, kv_dim) each.
    int (*cache_read)(BackendSequence *s, int layer, int pos, int n, float *keys, float *values, char *error);
    // Sets every cache slot to fill (0, or NaN so that a stray read shows), as run.c's cache_reset.
    int (*cache_reset)(BackendSequence *s, float fill, char *error);
    // Device bytes: out[0] the weights, out[1] the KV cache, out[2] the scratch.
    void (*memory)(const BackendSequence *s, unsigned long long out[3]);
    void (*free)(BackendSequence *s);
} Backend;

#ifdef __cplusplus
}
#endif

#endif
