"""PyTorch adapter: models, data-parallel gradient sync and the training engine."""
