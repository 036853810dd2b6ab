"""Model families: everything training (library/train) and generation (library/sample) both need about one model.

Per family: the hooks of `interface.ModelFamily` (loading, encoding, noise and timesteps, prediction, loss target,
the generation pipeline), latent packing, noise schedules and sigma tables, conditioning ids and model placement
(fp8 / block swap). Both library/train and library/sample import from here and never from each other; this package
imports neither of them.
"""
