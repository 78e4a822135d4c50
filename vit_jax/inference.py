"""Classify images with a trained or published checkpoint: load, preprocess, predict.

    from vit_jax import inference
    clf = inference.ImageClassifier.from_pretrained('workdir/')  # or .npz, timm, HF files
    for preds in clf.predict(['cat.jpg', 'dog.png']):
      print([(p.label, round(p.probability, 3)) for p in preds])

Preprocessing is the evaluation preprocessing of the training run when the checkpoint
records it (an Orbax workdir of this project), with the label ops removed, run by the
same ops as evaluation (`vit_jax.data.preprocess_ops`); otherwise `default_pp`:
`decode|resize(S)|value_range(-1, 1)` at the model's resolution S for ViT and BiT, which
is what the published checkpoints expect (mean = std = 0.5), and timm's evaluation
(resize, central crop, ImageNet mean/std) for Swin, ResNet and Res2Net. Label names come
from the checkpoint (class names of the training run, a transformers `id2label`), a label
file, or for 1,000-class heads the ImageNet-1k names.
"""

import dataclasses
import os
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from vit_jax import image_files
from vit_jax import labels as labels_lib
from vit_jax import models
from vit_jax.checkpoints import pretrained
from vit_jax.models import registry


@dataclasses.dataclass(frozen=True)
class Prediction:
  label: str
  index: int
  probability: float


def default_pp(image_size: int, family: str = 'vit') -> str:
  """The evaluation preprocessing weights of `family` expect when they record none: the
  original ViT and BiT releases (and timm's copies of them) take [-1, 1] at the model's
  size; timm's Swin, ResNet, ResNeXt and Res2Net weights take ImageNet mean/std after a
  resize to 8/7 of the size and a central crop (timm's crop_pct 0.875)."""
  scaling = registry.pixel_scaling(family)
  if scaling == 'normalize':
    return (f'decode|resize_small({image_size * 8 // 7})|central_crop({image_size})|'
            f'{scaling}')
  return f'decode|resize({image_size})|{scaling}'


class UnreadableImageError(ValueError):
  """An image that cannot be read or decoded; the message names it."""


def _as_image_list(images) -> list:
  """One image (path, bytes, PIL image, HxW or HxWxC array with C 1-4) -> [it]; a
  sequence (or iterator) or an NxHxW / NxHxWxC array -> its images."""
  if isinstance(images, (str, os.PathLike, bytes)) or hasattr(images, 'convert'):
    return [images]
  if hasattr(images, 'ndim') and hasattr(images, 'shape'):
    if images.ndim == 2 or (images.ndim == 3 and images.shape[-1] in (1, 2, 3, 4)):
      return [images]  # HxW, HxWxC
    return list(images)  # NxHxW (grayscale), NxHxWxC
  return list(images)


PROBABILITIES = ('softmax', 'sigmoid')


class ImageClassifier:
  """A model (of any family) and its preprocessing and labels; predictions are batched
  and jitted. model_state: the Flax collections besides params (BatchNorm statistics).
  probabilities: 'softmax' (one class per image), or 'sigmoid' (independent classes: a
  head trained with the sigmoid loss, e.g. ImageNet-21k pre-training)."""

  def __init__(self, module: models.VisionTransformer, params, *, pp: str,
               class_names: Sequence[str] | None = None, batch_size: int = 32,
               config=None, model_state=None, probabilities: str = 'softmax'):
    if probabilities not in PROBABILITIES:
      raise ValueError(f'probabilities={probabilities!r} is not one of {PROBABILITIES}')
    self.probabilities = probabilities
    self.module = module
    self.params = params
    self.model_state = dict(model_state or {})
    self.config = config
    self.pp = pp
    self.batch_size = batch_size
    self.class_names = list(class_names) if class_names else None
    from vit_jax.data import preprocess_ops  # pylint: disable=g-import-not-at-top
    # Label ops (a workdir's pp_eval ends in onehot(...)) need a label, which an image to
    # classify has not: they were a KeyError 'label' for every image.
    pp = self.pp = preprocess_ops.without_ops(pp, preprocess_ops.LABEL_OPS)
    self._preprocess_one = preprocess_ops.parse(pp)
    self._apply = jax.jit(lambda p, s, x: module.apply({'params': p, **s}, x, train=False))

  @classmethod
  def from_pretrained(cls, path, *, model=None, labels=None, pp: str | None = None,
                      batch_size: int = 32) -> 'ImageClassifier':
    """Loads any checkpoint `vit_jax.checkpoints.pretrained.load_checkpoint` reads.

    model: registered name for what the file does not record (see load_checkpoint).
    labels: class names (a list, or a text file with one per line) overriding the
      checkpoint's own.
    pp: preprocessing ops overriding the checkpoint's evaluation preprocessing.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
      raise ValueError(f'batch_size={batch_size!r} must be a positive int')
    ckpt = pretrained.load_checkpoint(path, model=model)
    config = ckpt.config
    module = models.create(config)
    num_classes = int(config.get('num_classes') or 0)
    if not num_classes:
      raise ValueError(f'{path} has no classification head (num_classes=0): nothing to '
                       'predict')
    if isinstance(labels, (str, os.PathLike)):
      names = labels_lib.read_label_file(labels)
    elif labels is not None:
      names = list(labels)
    else:
      names = ckpt.class_names or labels_lib.names_for_head(num_classes)
    if names is not None and len(names) != num_classes:
      source = (f'the labels file {os.fspath(labels)}' if isinstance(labels, (str, os.PathLike))
                else 'labels' if labels is not None else path)
      raise ValueError(f'{len(names)} class names for a head of {num_classes} classes '
                       f'({source})')
    from vit_jax.data import preprocess_ops  # pylint: disable=g-import-not-at-top
    weights_pp = (preprocess_ops.without_ops(ckpt.pp_eval, preprocess_ops.LABEL_OPS)
                  if ckpt.pp_eval else default_pp(config.image_size, registry.family_of(config)))
    params = jax.tree.map(jnp.asarray, ckpt.params)
    classifier = cls(module, params, pp=weights_pp if pp is None else pp, class_names=names,
                     batch_size=batch_size, config=config,
                     model_state=jax.tree.map(jnp.asarray, ckpt.model_state),
                     probabilities='sigmoid' if ckpt.loss == 'sigmoid_xent' else 'softmax')
    # The preprocessing the weights come with (the run's, the file's, or the family's
    # default: weights_pp_recorded says which), for comparing a `pp` given here with it.
    classifier.weights_pp = weights_pp
    classifier.weights_pp_recorded = bool(ckpt.pp_eval)
    return classifier

  @property
  def num_classes(self) -> int:
    return int(self.module.num_classes)

  def label(self, index: int) -> str:
    if self.class_names is None:
      return f'class {index}'
    return self.class_names[index]

  def read(self, images) -> tuple[np.ndarray, dict[int, str]]:
    """(the preprocessed images that could be read, float32 NHWC; {index: error} of the
    others: a missing file, bytes no decoder takes, an array of the wrong shape).

    images: one image (a path, encoded bytes, a PIL image, an HxW or HxWxC uint8 array,
    C 1-4) or a sequence of them (an NxHxW or NxHxWxC array is N images).
    """
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    out, errors = [], {}
    for i, image in enumerate(_as_image_list(images)):
      try:
        data = image_files.read_image(image)
        example = self._preprocess_one({'image': tf.constant(data)})
        out.append(np.asarray(example['image'], np.float32))
      except (OSError, ValueError, tf.errors.OpError) as e:
        message = image_files.decoder_error(getattr(e, 'message', None) or str(e))
        errors[i] = f'{type(e).__name__}: {message.splitlines()[0] if message else ""}'
    shapes = {x.shape for x in out}
    if len(shapes) > 1:
      raise ValueError(f'preprocessing {self.pp!r} gives images of different shapes '
                       f'{sorted(shapes)}: end it with a resize or crop to a fixed size')
    return (np.stack(out) if out else np.zeros((0, 1, 1, 3), np.float32)), errors

  def preprocess(self, images) -> np.ndarray:
    """Images (see `read`) -> float32 NHWC; UnreadableImageError names the first image
    that cannot be read."""
    listed = _as_image_list(images)  # once: an iterator can be read only once
    pixels, errors = self.read(listed)
    if errors:
      i = min(errors)
      what = (str(listed[i]) if isinstance(listed[i], (str, os.PathLike))
              else f'image {i}')
      more = f' (and {len(errors) - 1} more)' if len(errors) > 1 else ''
      raise UnreadableImageError(f'cannot read {what}: {errors[i]}{more}')
    return pixels

  def logits(self, pixels: np.ndarray) -> np.ndarray:
    """Logits of preprocessed images, in batches of `batch_size` (one compilation)."""
    pixels = np.asarray(pixels, np.float32)
    n, bs = len(pixels), self.batch_size
    chunks = []
    for start in range(0, n, bs):
      chunk = pixels[start:start + bs]
      pad = bs - len(chunk) if n > bs else 0  # a single short batch compiles as it is
      if pad:
        chunk = np.concatenate([chunk, np.zeros((pad,) + chunk.shape[1:], chunk.dtype)])
      out = np.asarray(self._apply(self.params, self.model_state, chunk), np.float32)
      chunks.append(out[:len(out) - pad])
    return np.concatenate(chunks) if chunks else np.zeros((0, self.num_classes), np.float32)

  def probs(self, logits) -> np.ndarray:
    """Probabilities of logits, (N, classes): softmax, or sigmoid (`probabilities`)."""
    logits = np.asarray(logits, np.float32)
    if self.probabilities == 'sigmoid':
      return np.asarray(jax.nn.sigmoid(logits))
    return np.asarray(jax.nn.softmax(logits, axis=-1))

  def predict_proba(self, images) -> np.ndarray:
    """Probabilities (`probs`), (N, classes)."""
    return self.probs(self.logits(self.preprocess(images)))

  def predict(self, images, top_k: int = 5) -> list[list[Prediction]]:
    """The top_k classes of each image, most probable first."""
    return self.top_k(self.logits(self.preprocess(images)), top_k)

  def top_k(self, logits, top_k: int = 5) -> list[list[Prediction]]:
    """The top_k classes of each row of logits, most probable first."""
    if top_k < 1:
      raise ValueError(f'top_k={top_k} must be at least 1')
    probs = self.probs(logits)
    top_k = min(top_k, probs.shape[-1])
    result = []
    for row in probs:
      order = np.argsort(-row, kind='stable')[:top_k]
      result.append([Prediction(self.label(int(i)), int(i), float(row[i])) for i in order])
    return result
