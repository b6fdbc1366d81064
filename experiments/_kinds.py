"""The benchmark rows shared by bench_scan and bench_digest: a kind name -> config of a size."""

from configs import dense, moe, mole

KINDS = {
    "dense": lambda s: dense.get_config(f"size={s}"),
    "moe-10e": lambda s: moe.get_config(f"size={s},experts=10,topk=2"),
    "mole-4e": lambda s: mole.get_config(f"size={s},experts=4"),
}
