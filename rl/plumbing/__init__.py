"""The run plumbing: config and its checks, data, run directories, checkpoints and their
file format, logs, processes, and building a run's parts from its config."""
