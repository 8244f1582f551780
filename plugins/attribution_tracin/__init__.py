"""TracIn (Pruthi et al. 2020): gradient dot products summed over training checkpoints."""
