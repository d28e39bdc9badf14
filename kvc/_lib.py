"""cffi (ABI mode) declarations of libkvc.so, the C engine built from run.c by `make`."""
from __future__ import annotations

import os
from pathlib import Path

import cffi
import numpy as np

ffi = cffi.FFI()
ffi.cdef(
    """
    typedef struct {
        int dim, hidden_dim, n_layers, n_heads, n_kv_heads, head_dim, vocab_size, seq_len;
        float rope_theta, norm_eps;
        int shared_classifier, bos_id, eos_id;
    } Config;
    typedef struct Model Model;
    typedef struct Sequence Sequence;
    typedef struct Pool Pool;
    typedef struct Sampler Sampler;

    const char *kvc_last_error(void);
    Model *kvc_open(const char *checkpoint, const char *tokenizer);
    void kvc_close(Model *m);
    const Config *kvc_config(const Model *m);
    int kvc_has_tokenizer(const Model *m);
    Sequence *kvc_sequence_new(const Model *m, int context, int threads, int type_k, int type_v, int rotate);
    Sequence *kvc_sequence_new_h2o(const Model *m, int budget, int recent, int threads, int type_k, int type_v, int rotate);
    Sequence *kvc_sequence_new_window(const Model *m, int window, int sinks, int threads, int type_k, int type_v, int rotate);
    Sequence *kvc_sequence_new_on(const Model *m, const char *device, int context, int threads, int type_k, int type_v,
                                  int rotate);
    int kvc_cache_type(const char *name);
    int kvc_cache_rotates(const Sequence *seq);
    void kvc_memory(const Model *m, const Sequence *seq, unsigned long long out[3]);
    void kvc_threads(const Sequence *seq, long long out[4]);
    void kvc_sequence_free(Sequence *seq);
    int kvc_context(const Sequence *seq);
    int kvc_forward(const Model *m, Sequence *seq, const int *tokens, int n, int pos, float *logits);
    float *kvc_logits(Sequence *seq);
    int kvc_cache_read(const Sequence *seq, int layer, int pos, int n, float *keys, float *values);
    const void *kvc_cache_data(const Sequence *seq, int which);
    int kvc_cache_reset(Sequence *seq, float fill);
    int kvc_length(const Sequence *seq);
    int kvc_session_save(const Model *m, Sequence *seq, const Sampler *sampler, const char *path);
    int kvc_session_load(const Model *m, Sequence *seq, Sampler *sampler, const char *path);
    int kvc_tokens(const Sequence *seq, int *out, int capacity);
    Pool *kvc_pool_new(const Model *m, int n_blocks, int block_size, int threads, int type_k, int type_v, int rotate);
    void kvc_pool_free(Pool *pool);
    unsigned long long kvc_block_bytes(const Model *m, int block_size, int type_k, int type_v, int rotate);
    void kvc_pool_stats(const Pool *pool, long long out[6]);
    void kvc_pool_poison(Pool *pool, int on);
    Sequence *kvc_pool_sequence(Pool *pool);
    Sequence *kvc_pool_sequence_window(Pool *pool, int window, int sinks);
    int kvc_step_room(const Sequence *seq);
    int kvc_block_table(const Sequence *seq, int *out, int capacity);
    Sequence *kvc_fork(Sequence *seq);
    int kvc_truncate(Sequence *seq, int len);
    int kvc_reuse_prefix(Sequence *seq, const int *tokens, int n);
    int kvc_blocks_needed(const Sequence *seq, int n);
    int kvc_step(const Model *m, Pool *pool, Sequence **seqs, const int *counts, const int *tokens, int n, float *logits);
    int kvc_encode(const Model *m, const char *text, int add_bos, int special, int *out, int capacity);
    int kvc_encode_capacity(int text_bytes);
    int kvc_decode(const Model *m, const int *ids, int n, char *out, int capacity);
    int kvc_token_text(const Model *m, int prev, int token, const char **text);
    int kvc_chat_encode(const Model *m, const char **roles, const char **contents, int n, int start,
                        int generation_prompt, int **ids);
    int kvc_chat_render(const Model *m, const char **roles, const char **contents, int n, int generation_prompt,
                        char **text);
    int kvc_chat_style(const Model *m);
    int kvc_end_of_turn(const Model *m);
    void kvc_free(void *p);
    Sampler *kvc_sampler_new(int vocab_size, float temperature, float topp, int topk, unsigned long long seed);
    void kvc_sampler_free(Sampler *s);
    int kvc_sample(Sampler *s, float *logits);
    """
)


# The library of each device, and the make target that builds it: the CPU engine, the CUDA build,
# and the CUDA build's kernels run on the CPU by cuda_sim.h.
LIBRARIES = {"cpu": ("libkvc.so", "make"), "cuda": ("libkvc_cuda.so", "make cuda"),
             "cuda-sim": ("libkvc_cuda_sim.so", "make cuda-sim")}


def _find_library(device: str) -> str:
    if device not in LIBRARIES:
        raise ValueError(f"unknown device {device!r} ({', '.join(LIBRARIES)})")
    env = os.environ.get("KVC_LIB")
    if env and device == "cpu":  # KVC_LIB names the CPU library (a sanitized build, say)
        return env
    name, target = LIBRARIES[device]
    path = Path(__file__).resolve().parent.parent / name
    if not path.exists():
        raise OSError(f"{path} not found: build it with `{target}`")
    return str(path)


_libs: dict = {}


def load(device: str = "cpu"):
    """The library of a device (opened on first use, so importing kvc needs no build)."""
    if device not in _libs:
        # never unloaded: libgomp's idle worker threads must not outlive its code at exit
        _libs[device] = ffi.dlopen(_find_library(device), ffi.RTLD_NOW | ffi.RTLD_NODELETE)
    return _libs[device]


def sequence_ints(fill, seq) -> np.ndarray:
    """The ints a C call of kvc_tokens' kind copies out of sequence seq, as int32: fill(seq, out,
    capacity) copies at most capacity of them and returns how many there are (out NULL: asks).
    kvc_tokens: the token at each row the cache holds; kvc_block_table: the block table."""
    out = np.empty(fill(seq, ffi.NULL, 0), dtype=np.int32)
    fill(seq, ffi.cast("int *", ffi.from_buffer(out)), out.size)
    return out


def last_error(lib=None) -> str:
    """The calling thread's last error message from lib (default: the CPU library)."""
    return ffi.string((lib or load()).kvc_last_error()).decode("utf-8", "replace")
