"""The graph pass: one Dynamo graph in, Based attention sites found, verified and rewritten.

canonicalize (lower to ATen, read views and scalars) -> match (with its readers: mask,
polynomial, feature_map, linear_form; records in candidate) -> verify (the numerical probe,
evaluate) -> rewrite. ``driver.run_pass`` runs the steps; ``inplace`` and ``inputs`` hold the
analyses of in-place writes and of the region's inputs (buffers baked into a rewrite);
``report`` and ``refusal`` say what was found and why a candidate was refused.
"""
