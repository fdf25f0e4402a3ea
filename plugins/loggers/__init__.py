"""Built-in loggers: where a training run reports its epochs."""
