"""Joey engine: consumes pipeline inputs, runs the models, produces outputs, errors and logs."""
