"""Sweeps: a study's runs expanded from its file, each trained, exported and evaluated in its own
process (`worker`), locally or as a SLURM job array through submitit (`slurm`), and the report
that a sweep prints and writes (`sweep.json`, `results.md`, curves). Imports every layer below it
up to `eval`.
"""
