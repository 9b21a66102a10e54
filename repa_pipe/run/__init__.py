"""The run contract: what a training run leaves behind (RUN/config.json, RUN/checkpoints/*.pt), typed, and the one
loader every command reads checkpoints and weight files with."""
