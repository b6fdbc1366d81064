"""Models in and out: Hugging Face model directories imported as workdirs, workdirs exported
as Hugging Face directories the reference code loads (`families.py`: config and tensor names,
`checkpoint_dir.py`: safetensors read a slice at a time, `hf_import.py`, `hf_export.py`).

May import the ground floor, parallel, data, model and train (checkpoints, the trainer's
mesh and state layout, the workdir's files); nothing above.
"""
