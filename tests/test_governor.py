"""The thread governor (run.c, Sequences): when a thread of the forward pass is descheduled because
another process holds its core, later blocks run on fewer threads, with the same results.

A child process pinned to one CPU runs SmolLM2 on 2 threads: the two threads then always share a
core, as they would with another process busy on the second core of a 2-core machine.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from helpers import ROOT, RUN

# Decode blocks after the prompt: enough for two tries of the full team (16, then 32 blocks apart),
# and few enough to stay under 128 positions, where attention is not split into ranges by thread
# count (ATTENTION_MIN_RANGE): there a 1-thread Model computes the very same sums as a 2-thread one.
DECODE_STEPS = 100

CHILD = """
import json, os, sys
import numpy as np
os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})  # before the OpenMP threads exist: they inherit it
import kvc

def run(threads):
    model = kvc.Model(sys.argv[1], seq_len=256, threads=threads)
    prompt = model.encode("The lighthouse at the end of the harbour was built in a dry spring.")
    logits = model.prefill(prompt, 0)
    tokens = []
    for i in range(int(sys.argv[2])):
        tokens.append(int(np.argmax(logits)))
        logits = model.prefill(tokens[-1:], len(prompt) + i)
    return model.thread_use(), tokens, logits

use, tokens, logits = run(2)
_, tokens_1, logits_1 = run(1)
print(json.dumps({"use": use, "same_tokens": tokens == tokens_1, "same_logits": bool(np.array_equal(logits, logits_1))}))
"""


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="needs os.sched_setaffinity (Linux)")
def test_two_threads_on_one_core_fall_back_to_one_with_the_same_results(smollm2_q4_bin):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="2")
    proc = subprocess.run([sys.executable, "-c", CHILD, str(smollm2_q4_bin), str(DECODE_STEPS)], capture_output=True,
                          text=True, timeout=300, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    use = out["use"]
    assert use["threads"] == 2 and use["blocks"] == 1 + DECODE_STEPS
    assert use["team"] == 1, use  # the core is still shared at the end
    # two blocks to notice, then a try of the full team after 16 reduced blocks and after 32 more:
    # each try is one block on 2 threads that finds the core still shared
    full = use["blocks"] - use["reduced_blocks"]
    assert 2 + 2 <= full <= 2 + 4, use
    assert out["same_tokens"] and out["same_logits"]


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="needs os.sched_setaffinity (Linux)")
def test_cli_says_when_blocks_ran_on_fewer_threads(smollm2_q4_bin):
    one_cpu = {min(os.sched_getaffinity(0))}
    proc = subprocess.run([str(RUN), str(smollm2_q4_bin), "-t", "0", "-n", "40", "-j", "2", "-i", "Hello"],
                          capture_output=True, text=True, timeout=120, preexec_fn=lambda: os.sched_setaffinity(0, one_cpu))
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("threads: ")]
    assert len(lines) == 1 and "ran on fewer than 2 threads (another process was using a core)" in lines[0], proc.stderr
