"""The compiler: the ``convrot`` torch.compile backend and the stages it runs on each graph (match, decide,
prepare, rewrite, attention, lower), ``convrot_compiler.compile`` for whole models (regional compilation,
CUDA-graph replay, released weights), and the same rewrite as an Inductor post-grad pass."""
