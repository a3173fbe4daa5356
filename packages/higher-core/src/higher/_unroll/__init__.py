"""How an unroll pays for its meta-gradient: the memory modes behind `innerloop_ctx(unroll=...)`.

- `modes`: the public mode values (`Full`, `Recompute`, `Truncated`, `ForwardMode`) and `resolve`,
  which turns the user's `unroll=` argument into one of them.
- `routing`: what the modes share: the optimizer whose `step` a mode drives, the state a step ran
  with besides its weights (random numbers, buffers, train/eval flags), the graph checks.
- `recompute`: `Recompute` and `Truncated`: each step's graph is dropped and rebuilt during the
  backward pass (all of it, or the last `window` steps).
- `forward`: `ForwardMode`: forward-mode derivatives for a few hyperparameters, carried along the
  unroll, so memory is flat in the number of steps.

The full unroll (the default) is the plain optimizer step and needs none of this.
"""
