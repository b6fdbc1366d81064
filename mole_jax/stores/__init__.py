"""Stores: the one format behind every offloaded-weight store (tensorstore zarr3 arrays, a
manifest written last, checks, publish), where a store lives (`location`: a folder or an s3://,
gs://, http(s):// URL; `remote`: publishing and integrity checks without rename or download),
its quantisations (int8, NF4/NF3, int2-4), digests of (sharded) arrays, and the two stores built
on it: MoLE lookup tables (`lut`) and MoE experts (`experts`). Knows arrays and bytes, never a
model. Imports the ground floor only.
"""
