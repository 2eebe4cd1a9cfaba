"""The command line and what it runs: demo, generate, inspect, eval, the model and pipeline benchmarks, and
the built-in models and pipelines they use."""
