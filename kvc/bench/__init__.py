"""`make bench` (`python -m kvc.bench`): how fast kvc runs SmolLM2-135M here, beside llama.cpp, and how
close Q8_0 stays to f32.

Side by side (with `make peer`'s llama-bench): for each weight type (f32, q8_0, the shipped q4_1) and
thread count (1, 2), kvc and llama.cpp measured alternately on the same weights, several rounds:
prefill tok/s for 128- and 512-token prompts and decode tok/s over 256 tokens, then decode with
one core kept busy by a spinning process; medians, spreads and the ratio of the medians.

For each weight type and thread count a fresh subprocess measures prefill tok/s
for 128- and 512-token prompts, greedy decode tok/s over 256 tokens, ms per decoded token as the
position grows to 2,048, and its own peak RSS (the peak only grows within a process, so each
configuration gets its own). Decode reads every weight once per token, so tok/s times the bytes
read per token is an effective memory bandwidth, set beside a read bandwidth the bench measures
itself. The f32 and Q8_0 models' logits on a fixed English text give Q8_0's quality.

For the KV cache's element types (2 threads, a child each): ms per decoded token with the cache
filled to 0..8,192 positions (the context's end) for f32, f16, bf16, q8_0, q4_0 and rotated q4_0 K+V
with Q8_0 weights, f32, f16 and q8_0 with f32 weights, the RSS after each fill, Model.memory(), and a
short-context decode against the f32 cache; generating n tokens with the cache and without it
(every token recomputing the sequence), with the growth exponent of total time in n; and each KV
cache type's perplexity and KL divergence against the f32 cache (kvc.kvquality, part kv-quality).

Past the model's context (part long-context, Q8_0 weights): perplexity by position over 16,384 tokens
of the pydoc topics with a dense cache (its context only), windows of 256, 512 and 1,024 positions
with and without 4 attention sinks, and H2O where the engine has it (kvc.longppl); and ms/token and
RSS every 2,000 tokens over 20,000 tokens generated with a 1,024-position window (`window`).

The modules, one job each:

- `__main__`: the command line (and the hidden child mode that measures one configuration);
- `suite`: the whole run: side by side with llama.cpp, roofline, every configuration in a child
  process, quality, the cache types, the no-cache curve, the cache types' quality and the long-context
  part (--parts picks);
- `child`: runs one configuration in a child process and reads back its JSON line;
- `files`: where the models, the source GGUF and the outputs are;
- `workload`: what is measured: the sizes and the fixed text;
- `timing`: engine-neutral timing loops and the records they produce;
- `kvc_run`: every measurement of one kvc configuration (kvc.Model's public API);
- `cache_types`: one KV cache configuration's ms/token and RSS as the cache fills, and its summary;
- `no_cache`: generating with and without the cache, and the growth exponent;
- `window`: ms/token and RSS over a long generation with a sliding-window cache;
- `side_by_side`: kvc and llama-bench alternately on the same weights, and the busy-core rounds;
- `peer`: the llama.cpp tools `make peer` builds, its requantized GGUFs, and llama.cpp's own KV cache
  quality (`kld`);
- `traffic`: bytes a decode step reads; `bandwidth`: the measured read bandwidth (roofline);
- `rss`: this process's resident memory;
- `logit_quality`: top-1 agreement, KL and perplexity of two models' logits;
- `machine`: what the machine is and how busy it is;
- `tables` and `plot`: the markdown tables and the PNGs (bench.png, cache.png).
"""
from .logit_quality import quality  # kvc.bench.quality: what tests/test_quantized.py checks on SmolLM2

__all__ = ["quality"]
