"""Stores: the one on-disk format behind every offloaded-weight store (tensorstore zarr3 arrays,
a manifest written last, checks, publish), its quantisations (int8, NF4/NF3, int2-4), digests of
(sharded) arrays, and the two stores built on it: MoLE lookup tables (`lut`) and MoE experts
(`experts`). Knows arrays and bytes, never a model. Imports the ground floor only.
"""
