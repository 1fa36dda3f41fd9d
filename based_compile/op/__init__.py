"""The ``based`` custom operator and what runs under it.

- ``spec``: ``BasedSpec``, the record of one site (layout, scale, coefficients, causal, normalise,
  eps, GQA group) that the graph pass derives and the operator consumes;
- ``custom_op``: ``torch.ops.based.attention`` / ``attention_backward`` (fake implementations,
  autograd) and ``based_attention``;
- ``policy``: which kernel runs, by mode and shape; ``config``: the user's kernel setting;
- ``cpu_path``: the PyTorch implementation for CPU tensors (quadratic, or chunked for long T);
- ``recurrent_step``: ``based::recurrent_step``, one decoding step against carried states;
- ``attention_with_state``: ``based::attention_with_state``, a prefill that also returns the final states;
- ``inference_only``, ``dispatch``: registration of the operators without a backward, and when an
  operator's Autograd kernel may call its CPU/CUDA implementation itself (no second dispatch).
"""
