"""Datasets: class tables, the built-in generator, real-dataset readers and the prepared format."""
