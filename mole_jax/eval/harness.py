"""lm-evaluation-harness model `mole_jax`: any workdir through any engine (in memory, LUT in
memory, LUT offloaded, MoE experts offloaded). Importing this module registers the model.

    lm_eval ... --model mole_jax --model_args workdir=W,mode=offload[,step=N,lut=lut,max_length=L]

Log-likelihoods are scored in batches sorted by length, each padded to a bucket length (a power
of two from 16, at most `max_length`) and, for engines that read nothing from storage, to
`batch_size` rows, so that jit compiles a handful of shapes; right padding never changes a score
(causal attention; MoE dispatch must be dropless, so a padding token takes no capacity from a real
one: capacity-dispatch MoE models are refused). Rolling log-likelihoods use lm-eval's disjoint
windows of `max_length` tokens (the first predicted from the end-of-text token, as a document
follows one in training), all documents' windows batched together. `generate_until` runs
`generate.generate_steps` (KV cache) one request at a time and stops at the end-of-text token or
the first `until` string. `usage()` reports what the engine read per token scored and per position
it processed (padding positions of offloaded MoE models route to experts too).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from mole_jax.data import pipeline
from mole_jax.errors import UserError
from mole_jax.infer.engine import build_engine, require_causal
from mole_jax.infer.generate import generate_steps
from mole_jax.model.config import model_config
from mole_jax.stores.location import io_counters, io_since
from mole_jax.workdir import Workdir

MIN_BUCKET = 16


@jax.jit
def _score(logits_BxLxV, targets_BxL):
    """(log p(target), target is the argmax) at every position."""
    logp = jax.nn.log_softmax(logits_BxLxV.astype(jnp.float32), axis=-1)
    picked = jnp.take_along_axis(logp, targets_BxL[..., None], axis=-1)[..., 0]
    return picked, logits_BxLxV.argmax(-1) == targets_BxL


def bucket(n: int, cap: int) -> int:
    """The padded length of an input of n tokens: the next power of two from MIN_BUCKET."""
    return min(cap, max(MIN_BUCKET, 1 << (max(n, 1) - 1).bit_length()))


@register_model("mole_jax")
class MoleJaxLM(TemplateLM):
    def __init__(
        self,
        workdir: str,
        mode: str = "experts",
        step: int | str | None = None,
        lut: str | None = None,
        max_length: int | str | None = None,
        batch_size: int | str | None = 16,
        **_ignored,  # lm-eval's max_batch_size, device, ...: not used by this adapter
    ):
        super().__init__()
        wd = Workdir(workdir)
        options = {"store": lut} if lut else {}
        self.engine = build_engine(wd, mode, None if step in (None, "") else int(step), **options)
        self._io_start = io_counters()
        self.tokenizer_ = wd.tokenizer()
        self.eos = pipeline.eos_token(self.tokenizer_)
        self.eot = self.tokenizer_.token_to_id(self.eos)
        self._max_length = int(max_length or wd.config.data.seq_len)
        limit = model_config(wd.config).max_seq_len
        if not 1 < self._max_length <= limit:
            raise UserError(f"max_length={self._max_length} must be in [2, {limit}]")
        m = model_config(wd.config)
        require_causal(m, "lm-eval scoring (each continuation token scored from its prefix)")
        if m.kind == "moe" and m.ffn.dispatch != "dropless" and mode == "experts":
            raise UserError(
                "a capacity-dispatch MoE's scores depend on what else is in the batch; score it "
                "with --config.model.ffn.moe.dispatch=dropless semantics (mode moe_offload) or "
                "train it dropless"
            )
        auto = batch_size is None or str(batch_size).startswith("auto")
        self.batch_size = 16 if auto else int(batch_size)
        self.tokens_fed = self.positions_fed = self.requests = 0
        self.engine.reset_stats()
        self.fill_rows = "bytes_read" not in self.engine.stats()  # storage engines: no filler

    @property
    def eot_token_id(self) -> int:
        return self.eot

    @property
    def max_length(self) -> int:
        return self._max_length

    def tok_encode(self, string: str, add_special_tokens=None, **kwargs) -> list[int]:
        return pipeline.tokenize(self.tokenizer_, string)

    def tok_decode(self, tokens) -> str:
        return pipeline.detokenize(self.tokenizer_, tokens)

    def usage(self) -> dict:
        """Tokens fed to the engine (padding excluded) and what it read for them."""
        stats = self.engine.stats()
        out = {"tokens": self.tokens_fed, "positions": self.positions_fed}
        out.update(mode=self.engine.mode, step=self.engine.step)
        out.update({k: v for k, v in self.engine.info.items() if k in ("lut_dtype", "dtype")})
        if "bytes_read" in stats and self.tokens_fed:
            out["bytes_read"] = int(stats["bytes_read"])
            out["bytes_read_per_token"] = stats["bytes_read"] / self.tokens_fed
            out["bytes_read_per_position"] = stats["bytes_read"] / self.positions_fed
        requests, nbytes = io_since(self._io_start)
        if requests and self.tokens_fed:  # what storage served (a round trip each, remote)
            out.update(io_requests=requests, io_bytes=nbytes)
            out["io_requests_per_token"] = requests / self.tokens_fed
            out["io_bytes_per_token"] = nbytes / self.tokens_fed
        return out

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
        """[(log p(continuation | context), continuation is greedy)] for (key, ctx, cont)."""
        self.requests += sum(key is not None for key, _, _ in requests)
        pairs = []
        for _, ctx, cont in requests:
            whole = (list(ctx) + list(cont))[-(self.max_length + 1) :]
            pairs.append((whole[:-1], whole[1:], min(len(cont), len(whole) - 1)))
        order = sorted(range(len(pairs)), key=lambda i: -len(pairs[i][0]))
        out = [None] * len(pairs)
        for start in range(0, len(order), self.batch_size):
            chunk = order[start : start + self.batch_size]
            for i, result in zip(chunk, self._score_batch([pairs[i] for i in chunk]), strict=True):
                out[i] = result
                if self.cache_hook is not None and requests[i][0] is not None:
                    self.cache_hook.add_partial("loglikelihood", requests[i][0], result)
        return out

    def _score_batch(self, pairs) -> list[tuple[float, bool]]:
        width = bucket(max(len(inp) for inp, _, _ in pairs), self.max_length)
        rows = self.batch_size if self.fill_rows else len(pairs)
        ids = np.full((rows, width), self.eot, np.int32)
        targets = np.full((rows, width), self.eot, np.int32)
        for r, (inp, tgt, _) in enumerate(pairs):
            ids[r, : len(inp)], targets[r, : len(tgt)] = inp, tgt
        self.tokens_fed += sum(len(inp) for inp, _, _ in pairs)
        self.positions_fed += ids.size
        logits, _ = self.engine.forward(ids, prepared=self.engine.prepare(ids))
        logp, greedy = (np.asarray(x) for x in _score(logits, jnp.asarray(targets)))
        results = []
        for r, (inp, _, n) in enumerate(pairs):
            span = slice(len(inp) - n, len(inp))
            results.append((float(logp[r, span].sum()), bool(greedy[r, span].all())))
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        self.requests += len(requests)
        windows, owner = [], []
        for d, req in enumerate(requests):
            tokens = self.tok_encode(req.args[0])
            for w in get_rolling_token_windows(tokens, self.eot, self.max_length, context_len=1):
                windows.append((None, *make_disjoint_window(w)))
                owner.append(d)
        out = [0.0] * len(requests)
        for d, (lp, _) in zip(owner, self._loglikelihood_tokens(windows), strict=True):
            out[d] += lp
        if self.cache_hook is not None:
            for req, total in zip(requests, out, strict=True):
                self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        self.requests += len(requests)
        return [self._generate(*req.args) for req in requests]

    def _generate(self, context: str, gen_kwargs: dict) -> str:
        kw = dict(gen_kwargs)
        until = kw.pop("until", None) or [self.eos]
        until = [until] if isinstance(until, str) else list(until)
        max_new = int(kw.pop("max_gen_toks", kw.pop("max_new_tokens", 256)))
        temperature = float(kw.pop("temperature", 0.0)) if kw.pop("do_sample", False) else 0.0
        max_new = min(max_new, self.max_length - 1)
        if max_new < 1:
            return ""
        prompt = (self.tok_encode(context) or [self.eot])[-(self.max_length - max_new) :]
        steps = generate_steps(self.engine, [prompt], max_new, temperature, 0, 0)
        try:
            while True:
                tokens = [int(t[0]) for t in next(steps)]
                if tokens and (tokens[-1] == self.eot or _stop(self.tok_decode(tokens), until)):
                    break
        except StopIteration as done:
            tokens = [int(t) for t in done.value["tokens"][0]]
        self.tokens_fed += len(prompt) + len(tokens) - 1  # the last sampled token is not fed
        self.positions_fed += len(prompt) + len(tokens) - 1
        if self.eot in tokens:  # the end of the text: nothing after it is the answer
            tokens = tokens[: tokens.index(self.eot)]
        text = self.tok_decode(tokens)
        cut = _stop(text, until)
        return text if cut is None else text[:cut]


def _stop(text: str, until: list[str]) -> int | None:
    """Where the first `until` string starts in `text` (None: none occurs)."""
    hits = [text.find(u) for u in until if u and u in text]
    return min(hits) if hits else None
