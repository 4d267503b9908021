"""
The scripts' plumbing, one module per concern: checkpoint files and load_model (checkpoints.py), a
training run's state: EMA, resume, bad steps, signals (train_state.py), pretrained weight files
(weights.py), torchrun's processes (distributed.py), command-line checks and their one-line errors
(cli.py), PNG grids of images (grids.py), the GPT stage's token files (token_files.py). None of it
is the method (tokenflow.py), a metric (metrics.py) or data (data/).
"""
