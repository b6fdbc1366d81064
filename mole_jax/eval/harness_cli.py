"""lm-eval's own command line with the `mole_jax` model registered and the offline pack found.

    python -m mole_jax.eval.harness_cli run --model mole_jax --model_args workdir=W,mode=offload \\
        --tasks mole_offline [--limit N] [--output_path DIR]

lm-eval has no plugin discovery for models, so this imports `mole_jax.eval.harness` (which registers
the model) before handing the arguments to lm-eval; `--include_path` defaults to the pack.
"""

from __future__ import annotations

import sys


def main(argv: list[str]) -> None:
    from lm_eval.__main__ import cli_evaluate

    import mole_jax.eval.harness  # noqa: F401 - registers the model
    from mole_jax.eval.zero_shot import PACK_DIR

    if "run" in argv[:1] and not any(a.startswith("--include_path") for a in argv):
        argv = [*argv, "--include_path", str(PACK_DIR)]
    sys.argv = ["lm_eval", *argv]
    cli_evaluate()


if __name__ == "__main__":
    main(sys.argv[1:])
