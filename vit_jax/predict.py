r"""Top-5 labels of images: `python -m vit_jax.predict --checkpoint=PATH IMAGE...`.

    python -m vit_jax.predict --checkpoint=/tmp/demo photos/*.jpg
    python -m vit_jax.predict --checkpoint=ViT-B_16-224.npz --labels=names.txt cat.jpg

PATH is anything `init_from` accepts: a workdir of this project (its newest checkpoint,
with the training run's class names and evaluation preprocessing), an original `.npz`,
or timm / transformers weights (`.safetensors`, `.bin`, `.pth`; transformers needs its
`config.json` beside the file, and the folder holding both, as `vit_jax.convert --to=hf`
or save_pretrained writes it, works too). A `.safetensors` file written by
`vit_jax.convert` is read with the model config, class names and preprocessing it
records. A folder among the IMAGE arguments stands for the
images in it (hidden files and folders left out). Images are preprocessed by the
evaluation ops and classified in jitted batches, one batch in memory at a time, each
printed when it is done (stderr gets a progress line with images/s and the time left
every 10 s); for each image the top-k labels are printed with their probabilities (softmax;
sigmoid for a workdir trained with the sigmoid loss, e.g. ImageNet-21k pre-training).
Images that cannot be read are named on stderr and skipped; the others are still
classified, and the exit status is then 1.
"""

import sys

from absl import app
from absl import flags
from absl import logging

from vit_jax import cli_flags
from vit_jax import cli_inputs
from vit_jax import tensorflow_startup

_CHECKPOINT = flags.DEFINE_string('checkpoint', None, 'Checkpoint file, workdir or '
                                  'transformers directory (config.json + model.safetensors).')
_MODEL = flags.DEFINE_string(
    'model', None, 'Registered model name, for what the file does not record (the '
    'numerics of an .npz, the heads of a timm state dict), optionally with fields changed: '
    "'NAME,num_heads=8', or 'num_heads=8' alone. Default: read from the weights.")
_LABELS = flags.DEFINE_string('labels', None, 'Text file of class names, one per line '
                              "(overrides the checkpoint's; needed for ImageNet-21k heads).")
_PP = flags.DEFINE_string('pp', None, 'Preprocessing ops overriding the checkpoint\'s, e.g. '
                          '"decode|resize_small(256)|central_crop(224)|value_range(-1, 1)".')
_TOP_K = flags.DEFINE_integer('top_k', 5, 'Labels printed per image.', lower_bound=1)
_BATCH = flags.DEFINE_integer('batch_size', 32, 'Images per jitted batch.')
_JSON = flags.DEFINE_bool('json', False, 'Print one JSON object per image instead.')


def _fail(message: str) -> None:
  cli_inputs.fail('vit_jax.predict', message)


def main(argv):
  import json  # pylint: disable=g-import-not-at-top
  tensorflow_startup.leave_keras_out()
  tensorflow_startup.quiet_native_logs()
  logging.set_verbosity(logging.WARNING)  # stdout is the answer; keep stderr for problems
  paths, clf = cli_inputs.images_and_classifier(
      'vit_jax.predict', argv[1:], _CHECKPOINT.value, model=_MODEL.value,
      labels=_LABELS.value, pp=_PP.value, batch_size=_BATCH.value)
  if clf.class_names is None:
    print(f'vit_jax.predict: no class names for this {clf.num_classes}-class head; '
          'printing indices (pass --labels=FILE)', file=sys.stderr)

  def emit(path, preds):
    if _JSON.value:
      print(json.dumps({'image': str(path), 'top_k': [
          {'label': p.label, 'index': p.index, 'probability': p.probability}
          for p in preds]}), flush=True)
      return
    print(path)
    for p in preds:
      print(f'  {p.probability:7.4f}  {p.label}  ({p.index})')
    sys.stdout.flush()

  classified, skipped = cli_inputs.predict_files(clf, paths, _TOP_K.value, emit)
  if not classified:
    _fail(f'none of the {len(paths)} images could be read')
  if skipped:
    sys.exit(1)  # the readable images are classified above; the others are named


if __name__ == '__main__':
  app.run(main, flags_parser=lambda argv: cli_flags.parse_flags(argv, bad_flag_status=2))
