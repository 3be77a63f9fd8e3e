"""The assembly of a training run from a Config: the pieces (builders, recipes, lr_schedule, finetune) and
the trainer that runs the epochs. Imports runtime/ and DeiT's root modules (engine, datasets, samplers, utils),
never config/ or main.py."""
