"""`flashpatch bench`: generation (generate.py; its batches of mixed-length prompts as the CLI runs them:
batched.py), training steps (train.py) and the kernels against SDPA's backends (kernels.py), each implementation
side by side in one process (switch.py)."""
