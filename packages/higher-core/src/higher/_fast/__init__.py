"""The fast paths: one inner loop over many tasks at once, and compiled steps and meta-steps.

- `tasks`: `innerloop_ctx(..., tasks=T)` (alias `batched_innerloop_ctx`): `T` tasks stacked
  along a leading dimension run as one inner loop under `torch.func.vmap`, with per-task fast
  weights and optimizer state.
- `compiled`: `innerloop_ctx(..., compile=True)` (alias `compile_step`): one inner step
  (forward, gradient, update) as a `torch.compile`d function, checked once per signature
  against the eager step.
- `metastep`: `meta_step` (alias `compile_meta_step`): a whole meta-step (the `k` inner steps,
  the outer loss and its gradient) as one function, compiled or run eagerly.
"""
