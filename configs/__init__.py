"""Config files: `get_config(arg)` programs loaded with `--config=configs/<kind>.py:<arg>`."""
