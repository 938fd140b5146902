"""groundlab's Optuna sweeper for Hydra (hydra/sweeper=groundlab_optuna): Hydra's Optuna sweeper whose shared study
resumes. Hydra only instantiates sweepers from the hydra_plugins namespace, hence this package's place."""
