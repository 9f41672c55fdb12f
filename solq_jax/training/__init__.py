"""Training: optimiser recipe, sharded train step, orbax checkpoints, metrics and the loop.

    from solq_jax.training import loop
    loop.train_and_evaluate(config, workdir)      # what train.py runs
"""
