"""Flat 'a/b/c' views of parameter trees and checked merging of loaded weights."""

from collections.abc import Mapping

import jax
import numpy as np

HEAD_KEYS = ('head/',)


class CheckpointMismatchError(ValueError):
  """Loaded weights do not fit the model: names the keys and shapes that differ."""


def flatten(tree, prefix: str = '') -> dict[str, np.ndarray]:
  """Nested mapping -> {'a/b/c': leaf} (leaves unchanged)."""
  out = {}
  for k, v in tree.items():
    key = f'{prefix}{k}'
    if isinstance(v, Mapping):
      out.update(flatten(v, key + '/'))
    else:
      out[key] = v
  return out


def flatten_for_export(params) -> dict[str, np.ndarray]:
  """flatten() of a ViT's params as other frameworks' files hold them: the encoder blocks
  unrolled (scan_layers=True stacks them), floats numpy lacks (bfloat16) as float32."""
  from vit_jax.models import scan_layout  # pylint: disable=g-import-not-at-top
  return {k: widened(v) for k, v in flatten(scan_layout.unstack_layers(params)).items()}


def widened(x) -> np.ndarray:
  """x as numpy; floats numpy and torch lack (bfloat16) as float32."""
  x = np.asarray(x)
  if x.dtype.kind == 'V' or (x.dtype.kind == 'f' and x.dtype not in (
      np.float16, np.float32, np.float64)):
    return x.astype(np.float32)
  return x


def unflatten(flat: Mapping[str, np.ndarray]) -> dict:
  """{'a/b/c': array} -> nested dict."""
  tree: dict = {}
  for key, value in flat.items():
    node = tree
    *parents, leaf = key.split('/')
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = value
  return tree


def _short(keys, limit=20):
  keys = sorted(keys)
  more = f' ... and {len(keys) - limit} more' if len(keys) > limit else ''
  return ', '.join(keys[:limit]) + more


def _mismatch_hint(differ, got, ref, representation_differs: bool = False) -> str:
  """Why shapes differ, where the keys tell: only the position embedding's token count
  (another resolution), only the head's outputs (another class count), the
  representation layer (its own line follows), else another architecture (width, MLP
  width, patch size, ...)."""
  def only_axis(k, axis):
    a, b = tuple(got[k].shape), tuple(ref[k].shape)
    return len(a) == len(b) and all(x == y for i, (x, y) in enumerate(zip(a, b))
                                    if i != axis % len(a))
  resolution = [k for k in differ if k.endswith('pos_embedding') and only_axis(k, 1)]
  classes = [k for k in differ if k.startswith(HEAD_KEYS) and only_axis(k, -1)]
  representation = [k for k in differ if representation_differs
                    and k.startswith(('pre_logits/',) + HEAD_KEYS)]
  if set(differ) - set(resolution) - set(classes) - set(representation):
    return (' (another architecture: width, MLP width, heads or patch size differ; '
            'vit_jax.checkpoints.architecture.infer_model_config(params) reads the '
            "weights' own)")
  hint = ''
  if representation:
    hint = ' (the representation layer differs: see the last line)'
  if resolution:
    hint += ' (another resolution: resample with vit_jax.models.resample_posemb)'
  if classes:
    hint += (' (another class count: start a new head, --config.init_head=reset when '
             'fine-tuning; in Python adapt_variables(..., keep_head=False) or '
             'merge_into(..., drop_head=True))')
  return hint


def merge_into(reference, loaded, *, drop_head: bool = False, strict: bool = True,
               what: str = 'checkpoint'):
  """Returns `loaded` arranged as the `reference` tree, after checking it fits.

  reference: the model's own (initialised or abstract) parameters; their dtypes are kept.
  loaded: parameters read from a checkpoint (nested or flat 'a/b/c').
  drop_head: take `head` from `reference` instead, for a new class count; and
    `pre_logits`, the representation layer, where one of the two lacks it (dropped from
    the checkpoint, or the model's own new one kept).
  strict: refuse missing and unexpected keys (shape mismatches are always refused).

  Raises CheckpointMismatchError listing missing keys, unexpected keys and every
  parameter whose shape differs, with both shapes.
  """
  ref = flatten(reference) if not _is_flat(reference) else dict(reference)
  got = flatten(loaded) if not _is_flat(loaded) else dict(loaded)
  if drop_head:
    got = {k: v for k, v in got.items() if not k.startswith(HEAD_KEYS)}
    if not any(k.startswith('pre_logits/') for k in ref):
      got = {k: v for k, v in got.items() if not k.startswith('pre_logits/')}
  taken_from_ref = {k for k in ref if drop_head and k.startswith(HEAD_KEYS)}
  ref_pre = {k for k in ref if k.startswith('pre_logits/')}
  if drop_head and (not any(k.startswith('pre_logits/') for k in got) or any(
      k in got and tuple(got[k].shape) != tuple(ref[k].shape) for k in ref_pre)):
    # A representation layer the weights lack, or of another width, starts new, as the
    # head does.
    taken_from_ref |= ref_pre
    got = {k: v for k, v in got.items() if not k.startswith('pre_logits/')}
  missing = set(ref) - set(got) - taken_from_ref
  unexpected = set(got) - set(ref)
  # Parameters first (BatchNorm statistics follow theirs), at most 50 listed.
  differ = sorted((k for k in set(ref) & set(got)
                   if tuple(got[k].shape) != tuple(ref[k].shape)),
                  key=lambda k: (k.startswith('batch_stats/'), k))
  wrong = [f'{k}: {tuple(got[k].shape)} in the {what}, {tuple(ref[k].shape)} in the model'
           for k in differ]
  pre_logits = [k for k in (missing | unexpected | set(differ))
                if k.startswith('pre_logits/')]
  problems = []
  if wrong:
    problems.append(f'shape mismatch{_mismatch_hint(differ, got, ref, bool(pre_logits))}:\n  '
                    + '\n  '.join(wrong[:50])
                    + (f'\n  ... and {len(wrong) - 50} more' if len(wrong) > 50 else ''))
  if strict and missing:
    problems.append(f'missing from the {what} ({len(missing)}): {_short(missing)}')
  if strict and unexpected:
    problems.append(f'unexpected in the {what} ({len(unexpected)}): {_short(unexpected)}')
  if problems and pre_logits:
    width = next((tuple(got[k].shape)[-1] for k in pre_logits
                  if k in got and k.endswith('kernel')), None)
    problems.append(
        'The representation layer (pre_logits) differs: '
        + (f'--config.model.representation_size={width} keeps the weights\' one'
           if width else '--config.model.representation_size=None leaves it out')
        + (", or --config.init_head=reset starts a new head" if not drop_head else '') + '.')
  if problems and strict and missing and unexpected:
    stacked = lambda keys: any('/encoderblock/' in k for k in keys)  # noqa: E731
    per_block = lambda keys: any('/encoderblock_0/' in k for k in keys)  # noqa: E731
    if stacked(missing) and per_block(unexpected):
      problems.append('The model stacks its blocks (scan_layers=True) and the weights have '
                      'one entry per block: pass vit_jax.models.stack_layers(params), or '
                      'create the model with scan_layers=False.')
    elif per_block(missing) and stacked(unexpected):
      problems.append('The weights stack the blocks and the model has one entry per block: '
                      'pass vit_jax.models.unstack_layers(params), or create the model '
                      'with scan_layers=True.')
  if problems:
    raise CheckpointMismatchError(f'the model cannot take the {what}:\n' + '\n'.join(problems))
  merged = {}
  for k, v in ref.items():
    if k in got:
      merged[k] = np.asarray(got[k]).astype(v.dtype)
    elif isinstance(v, jax.ShapeDtypeStruct):
      raise CheckpointMismatchError(
          f'{k} is not in the {what} and the reference parameters are abstract: pass '
          'initialised parameters (vit_jax.models.init_params) as the reference')
    else:
      merged[k] = v
  return unflatten(merged)


def _is_flat(tree) -> bool:
  return all(not isinstance(v, Mapping) for v in tree.values())


def plain(value):
  """Lists as tuples, recursively, also inside dicts: a config read from JSON has lists
  where a registered one has tuples, and the two must compare equal."""
  if isinstance(value, (list, tuple)):
    return tuple(plain(v) for v in value)
  if isinstance(value, dict):
    return {k: plain(v) for k, v in value.items()}
  return value
