"""edgefl's ground, which every room imports: the protocol's messages, configuration,
models, data, partitions, the wire format and the algorithm's device half (learners,
codecs); the application layer (CLI, demo, launcher) is ``edgefl.app``, above the rooms."""
