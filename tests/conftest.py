"""Test setup: 8 host CPU devices (set before jax is imported), strict rank promotion, and a small
corpus the tests write themselves. One integration test uses the real default corpus."""

import os
import sys
import tempfile

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# The tests run on the CPU (8 virtual devices) even where the [tpu] / [gpu-aot] compilers are
# installed: their backends are for `launch.py compile`, never started as devices here.
os.environ["JAX_PLATFORMS"] = "cpu"
# One XLA compilation cache for the test session and the launch.py processes it starts: the
# tests compile the same tiny programs many times over (CI starts from an empty cache).
os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), f"mole_jax_xla_{os.getuid()}")
)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")

_NOUNS = "king queen lord lady knight crown sword castle river night day heart moon star".split()
_VERBS = "loves fears seeks keeps leaves finds holds calls sees hears".split()
_ADJ = "noble gentle bold fair dark bright sweet grave proud young".split()


def synthetic_text(seed: int, n_sentences: int) -> str:
    """Grammatical, learnable English-like text: 'The bold king seeks the fair crown.'"""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n_sentences):
        a, b = rng.choice(_ADJ, 2)
        n1, n2 = rng.choice(_NOUNS, 2)
        out.append(f"The {a} {n1} {rng.choice(_VERBS)} the {b} {n2}.")
    return "\n".join(out) + "\n"


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    for i in range(12):
        (d / f"doc{i:02d}.txt").write_text(synthetic_text(i, 400))
    return d


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("cache"))


def tiny_overrides(cfg, corpus_dir, cache_dir, **train):
    """Shrinks a tiny config for tests: the test corpus, a 512-token BPE, short runs."""
    cfg.unlock()
    cfg.data.corpus = f"files:{corpus_dir}/*.txt"
    cfg.data.cache_dir = cache_dir
    cfg.data.vocab_size = 512
    cfg.data.seq_len = 32
    cfg.data.val_fraction = 0.2
    cfg.model.vocab_size = 512
    cfg.train.update(
        dict(
            steps=20,
            batch_size=16,
            eval_every=10,
            ckpt_every=10,
            eval_batches=2,
            progress=False,
            async_ckpt=False,
        )
    )
    cfg.train.update(train)
    cfg.lock()
    return cfg


def trained_workdir(tmp_path_factory, cfg, corpus_dir, cache_dir, steps: int = 20) -> str:
    """A workdir holding a tiny run of `cfg` for `steps` steps, checkpointed at the end."""
    from mole_jax.train import loop

    w = str(tmp_path_factory.mktemp(cfg.model.ffn.kind) / "w")
    cfg = tiny_overrides(
        cfg, corpus_dir, cache_dir, steps=steps, eval_every=steps, ckpt_every=steps
    )
    loop.run(cfg, w)
    return w


@pytest.fixture
def tiny_cfg(corpus_dir, cache_dir):
    from configs import dense

    return tiny_overrides(dense.get_config("size=tiny"), corpus_dir, cache_dir)


def run_bounded(cmd: list[str], timeout: float, env: dict | None = None, cwd: str = ROOT):
    """subprocess.run(capture_output, text) that fails the test past `timeout` seconds with the
    child's Python stacks (PYTHONFAULTHANDLER: SIGABRT makes it print every thread's), where
    pytest-timeout under xdist would end the worker and say only 'node down'."""
    import signal
    import subprocess

    env = dict(os.environ if env is None else env, PYTHONFAULTHANDLER="1")
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGABRT)
        out, err = proc.communicate()
        pytest.fail(f"{' '.join(cmd[1:])} ran past {timeout:.0f} s; its stacks:\n{err[-6000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)
