"""Training: optimiser recipe, sharded train step, orbax checkpoints, metrics and the loop.

    from solq_jax.training import loop
    trainer = loop.Trainer(config)
    trainer.fit(workdir, evaluation=...)     # train.py wires in COCO evaluation

Nothing here imports inference code: evaluation reaches the loop as a callable.
"""
