"""Evaluation averages and the `init_from` log line, on small hand-made inputs."""

import types

import jax
import numpy as np

from vit_jax import checkpoints
from vit_jax import models
from vit_jax.train import loop


def test_top5_is_reported_only_above_five_classes():
  sums = {'top1_sum': 3.0, 'top5_sum': 8.0, 'loss_sum': 12.0, 'count': 8.0}
  ten = loop.eval_metrics(sums, num_classes=10)
  assert ten == {'eval_top1': 3 / 8, 'eval_top5': 1.0, 'eval_loss': 1.5, 'eval_examples': 8}
  two = loop.eval_metrics(sums, num_classes=2)
  assert 'eval_top5' not in two and two['eval_top1'] == 3 / 8


def test_init_summary_names_kept_resampled_and_new_parameters():
  small = dict(num_layers=2, hidden_size=32, num_heads=2, mlp_dim=64, patch_size=8)
  old = models.create('ViT-Ti/16', **small, image_size=32, num_classes=10)
  new = models.create('ViT-Ti/16', **small, image_size=48, num_classes=3, scan_layers=True)
  loaded = types.SimpleNamespace(kind='npz', params=models.init_params(old, 32))
  params = models.init_params(new, 48)  # stacked blocks: compared in the unrolled layout
  total = len(checkpoints.flatten(loaded.params))
  line = loop.init_summary('/w/ViT.npz', loaded, params, {'init_head': 'reset'})
  # Everything but the position embedding (4x4 -> 6x6 patches) and the head is kept.
  assert line.startswith(f'/w/ViT.npz (npz checkpoint, {total} arrays; '
                         f'{total - 3} loaded as they are; ')
  assert ('1 resampled: Transformer/posembed_input/pos_embedding (1, 17, 32) -> (1, 37, 32)'
          in line)
  assert '2 not in the checkpoint or of another shape, initialised: head/bias, head/kernel' in line
  assert line.endswith('head: reset)')
  # init_head='keep' with the same classes keeps the head too.
  same = models.init_params(old, 32)
  line = loop.init_summary('/w/ViT.npz', loaded, same, {'init_head': 'keep'})
  assert f'{total} loaded as they are; head: keep' in line
  # An ImageNet-21k checkpoint's pre_logits layer, dropped by a model without one.
  with_pre_logits = models.create('ViT-Ti/16', **small, image_size=32, num_classes=10,
                                  representation_size=32)
  loaded = types.SimpleNamespace(kind='npz', params=models.init_params(with_pre_logits, 32))
  line = loop.init_summary('/w/ViT.npz', loaded, same, {'init_head': 'reset'})
  assert '2 not in the model, left out: pre_logits/bias, pre_logits/kernel' in line, line


def test_init_summary_names_a_resnet_head_as_the_head():
  """ResNet's classifier is `fc`: a new class count resets it, it is not 'resampled'."""
  config = models.get_config('ResNet-50')
  config.update(layers=(1, 1, 1, 1), num_classes=10)
  params = models.init_params(models.create(config), 32)
  old = jax.tree_util.tree_map_with_path(
      lambda p, x: np.zeros((x.shape[0], 7) if 'fc' in jax.tree_util.keystr(p) and x.ndim == 2
                            else (7,) if 'fc' in jax.tree_util.keystr(p) else x.shape,
                            np.float32), params)
  loaded = types.SimpleNamespace(kind='timm', params=old)
  line = loop.init_summary('/w/r.safetensors', loaded, params,
                           {'init_head': 'reset', 'model': config})
  assert 'resampled' not in line and 'fc/kernel' in line and 'head: reset' in line


def test_eval_hits_against_numpy_for_one_hot_smoothed_multi_hot_and_empty_labels():
  """An example with no label (all zeros, an empty multi-hot list) counted as a top-1 and
  top-5 hit: every class was 'positive'."""
  from vit_jax.train import step  # pylint: disable=import-outside-toplevel

  class Fixed:  # a "model" returning the batch's logits as they are
    num_classes = 7

    def apply(self, variables, images, train):
      del variables, train
      return images

  rng = np.random.default_rng(0)
  logits = rng.normal(size=(8, 7)).astype(np.float32)
  labels = np.zeros((8, 7), np.float32)
  labels[0, np.argmax(logits[0])] = 1                        # one-hot, a top-1 hit
  labels[1, np.argsort(logits[1])[-3]] = 1                   # third best: top-5 only
  labels[2] = 0.1 / 7
  labels[2, np.argmax(logits[2])] += 0.9                     # smoothed, a hit
  labels[3, np.argsort(logits[3])[[-1, -6]]] = 1             # multi-hot, a hit
  labels[4, np.argsort(logits[4])[0]] = 1                    # the worst: no hit
  # labels[5]: no label at all; labels[6]: none, smoothed
  labels[6] = 0.1 / 7
  labels[7] = 1  # every class positive: a hit
  out = jax.jit(step.make_eval_step(Fixed(), loss='sigmoid_xent'))(
      {}, {'image': logits, 'label': labels, '_mask': np.ones(8, np.int32)})
  top5 = np.argsort(-logits, axis=-1)[:, :5]
  # The positives by hand: the classes of the label, none for the rows without one.
  positive = [{int(np.argmax(logits[0]))}, {int(np.argsort(logits[1])[-3])},
              {int(np.argmax(logits[2]))}, set(np.argsort(logits[3])[[-1, -6]].tolist()),
              {int(np.argsort(logits[4])[0])}, set(), set(), set(range(7))]
  top1_ref = sum(int(np.argmax(l)) in p for l, p in zip(logits, positive))
  top5_ref = sum(bool(set(t) & p) for t, p in zip(top5, positive))
  assert (float(out['top1_sum']), float(out['top5_sum'])) == (top1_ref, top5_ref) == (4, 5)
  assert float(out['count']) == 8
