"""
The scripts' plumbing, one module per concern: checkpoint files and a training run's state
(checkpoints.py), pretrained weight files (weights.py), torchrun's processes (distributed.py),
command-line checks and their one-line errors (cli.py), PNG grids of images (grids.py). None of it
is the method (tokenflow.py) or data (data/).
"""
