"""Text generation through any engine: prefill the prompt, then sample one token at a time with
the KV cache. `launch.py generate`, the benchmarks and lm-eval's `generate_until` use it."""

from __future__ import annotations

import sys
import time

import numpy as np

from mole_jax.progress import Progress


def sample(logits_BxV: np.ndarray, temperature: float, top_k: int, rng) -> np.ndarray:
    """Greedy when temperature == 0, else softmax(logits / T) over the top_k (0: all) tokens."""
    if temperature <= 0:
        return logits_BxV.argmax(-1).astype(np.int32)
    z = logits_BxV.astype(np.float64) / temperature
    if top_k:
        kth = np.sort(z, axis=-1)[:, -top_k][:, None]
        z = np.where(z < kth, -np.inf, z)
    p = np.exp(z - z.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.array([rng.choice(len(row), p=row) for row in p], np.int32)


def generate(
    engine, prompt_BxP, max_new: int, temperature=0.0, top_k=0, seed=0, before_step=None
) -> dict:
    """Prefill the prompt, then sample `max_new` tokens one at a time with the KV cache.

    `engine`: any `engine.Engine`. `before_step(t)`, if given, runs untimed before forward call
    t (0: the prefill). Returns {'tokens' [B, max_new], 'prefill_s', 'step_s' (per decode step,
    blocked)}.
    """
    steps = generate_steps(engine, prompt_BxP, max_new, temperature, top_k, seed, before_step)
    # on stderr: stdout carries the generated text
    with Progress("generate", max_new, 0, "token", stream=sys.stderr) as progress:
        while True:
            try:
                tokens = next(steps)
            except StopIteration as done:
                return done.value
            progress.update(len(tokens) - progress.n)


def generate_steps(
    engine, prompt_BxP, max_new: int, temperature=0.0, top_k=0, seed=0, before_step=None
):
    """`generate` as a generator that yields the tokens sampled so far ([B] arrays) after the
    prefill and after every decode step (so that a benchmark can interleave several engines step
    by step, or a caller stop at a string); returns generate's dict."""
    hook = before_step or (lambda t: None)
    prompt = np.asarray(prompt_BxP, np.int32)
    b, p = prompt.shape
    rng = np.random.default_rng(seed)
    cache = engine.init_cache(b, p + max_new)
    hook(0)
    t0 = time.perf_counter()
    logits, cache = engine.forward(prompt, cache)
    last = np.asarray(logits[:, -1])
    prefill_s = time.perf_counter() - t0
    tokens, step_s = [], []
    yield tokens
    for t in range(max_new):
        nxt = sample(last, temperature, top_k, rng)
        tokens.append(nxt)
        if t + 1 == max_new:
            break
        hook(t + 1)
        t0 = time.perf_counter()
        logits, cache = engine.forward(nxt[:, None], cache)
        last = np.asarray(logits[:, -1])
        step_s.append(time.perf_counter() - t0)
        yield tokens
    return {"tokens": np.stack(tokens, axis=1), "prefill_s": prefill_s, "step_s": step_s}
