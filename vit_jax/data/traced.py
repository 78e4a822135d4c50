"""Python functions handed to `tf.data.Dataset.map`, traced as they are written.

By default tf.data runs AutoGraph on a mapped function: it parses the function's source
and that of every function it calls, and rewrites Python `if`/`for`/`while` on tensors
into graph control flow. The project's input code needs none of that: it branches on
tensors with explicit `tf.cond` and on Python values (dtypes, static shapes, op
arguments) with plain `if`. The rewrite still cost about 1.5 s when a run built its
training pipeline and 0.2 s more for each evaluation's, on a 2-core host (first batch of
the demo's training pipeline 2.5 -> 0.94 s). Tests check that the registered ops
(`tests/data/test_preprocess_ops.py`) give their eager results when traced this way.

Functions of one's own passed to the pipelines (`preprocess`, `batch_preprocess`, an op
added with `preprocess_ops.register`) are traced the same way: a branch on a tensor's
value takes `tf.cond`, not a Python `if` (which raises OperatorNotAllowedInGraphError).
"""

import tensorflow as tf


def without_autograph(fn):
  """fn, marked so that `Dataset.map` traces it without AutoGraph's rewrite."""
  return tf.autograph.experimental.do_not_convert(fn)
