"""edgefl's shared kernel: models, data, partitions, wire format, training, the CLI."""
