"""A seeded differential fuzzer for backend="based": composed Based-like programs against eager.

``python -m fuzz --seconds 600 --seed 0`` (see ``__main__.py``). Modules: ``source`` (the program
under construction), ``axes`` (generators along each axis of the README's table), ``mutate`` (one
semantic mutation), ``program`` (the composed program as source text and its reproducer),
``check`` (compile and compare with eager in float64; copied into every reproducer), ``run``
(run cases, classify them, summarise).
"""
