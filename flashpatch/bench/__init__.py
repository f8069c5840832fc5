"""`flashpatch bench`: generation (generate.py), training steps (train.py) and the kernels against SDPA's backends
(kernels.py), each implementation side by side in one process (switch.py)."""
