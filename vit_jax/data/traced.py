"""Python functions handed to `tf.data.Dataset.map`, traced as they are written.

By default tf.data runs AutoGraph on a mapped function: it parses the function's source
and that of every function it calls, and rewrites Python `if`/`for`/`while` on tensors
into graph control flow. The project's input code needs none of that: it branches on
tensors with explicit `tf.cond` and on Python values (dtypes, static shapes, op
arguments) with plain `if`. The rewrite still cost 2 to 3 s of parsing each time a
pipeline was built (a run builds one for training and one per evaluation) on a 2-core
host. `tests/data/test_preprocess_ops.py` checks that every registered op, and the
batch mixing, give their eager results when traced this way.
"""

import tensorflow as tf


def without_autograph(fn):
  """fn, marked so that `Dataset.map` traces it without AutoGraph's rewrite."""
  return tf.autograph.experimental.do_not_convert(fn)
