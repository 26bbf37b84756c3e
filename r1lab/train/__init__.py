"""Trainers. `loop.Trainer` is the one training loop; `pretrain` and `sft` feed it their data; recipes
(`recipe.Recipe`, TOML files in recipes/) hold every setting; `state` writes and finds checkpoints."""
