"""Operands of a custom-VJP layer made to vary over the same shard_map axes.

Inside `jax.shard_map` (with its default `check_vma=True`) every value is typed with the
mesh axes it varies over: activations vary over the batch axis, a replicated weight does
not. Autodiff of jax's own primitives inserts the casts and the reduction this implies;
a `custom_vjp` rule does not, and jax refuses a backward rule whose weight gradient
varies where the weight does not. Casting every operand to the union of their varying
axes before such a layer makes the rule's types match: the weight gradient is then
per-device, and shard_map sums it on the way out of the varying region, as for plain
autodiff (a `pmean` of the gradients gives the same result as without the custom rule).
Outside shard_map (or on a jax without these types) the operands are returned unchanged.
"""

import jax


def same_varying(*arrays):
  """`arrays` (None entries kept), each cast to vary over the axes any of them varies over."""
  try:
    axes = [jax.typeof(a).manual_axis_type.varying if a is not None else frozenset()
            for a in arrays]
  except AttributeError:  # a jax without varying-axis types
    return arrays
  union = frozenset().union(*axes)
  if not union:
    return arrays
  return tuple(a if a is None or ax == union
               else jax.lax.pcast(a, tuple(sorted(union - ax)), to='varying')
               for a, ax in zip(arrays, axes))
