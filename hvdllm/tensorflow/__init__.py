"""TensorFlow/Keras 3 adapter: models, data-parallel gradient sync and the training engine."""
