"""The `config.input` block: which data and which preprocessing (built by `builder.py`).

Every field has a default here; a config file overrides what its recipe needs, and any
field can be set on the command line (`--config.input.folder=/data/pets`).
"""

import ml_collections

FIELD_DOCS = {
    'source': "'tfds' (a tfds dataset by name) or 'folder' (<folder>/<split>/<class>/<image>)",
    'name': "tfds dataset name, e.g. 'imagenet2012', 'cifar10', 'bundled_mnist' (offline)",
    'data_dir': 'tfds data dir (local or gs://); None for ~/tensorflow_datasets',
    'folder': "root of an image folder dataset (source='folder')",
    'train_split': "training split; tfds slices allowed ('train[:99%]'); for a folder, "
                   "the subfolder's name",
    'eval_split': "evaluation split: 'validation', 'test', 'train[99%:]' (tfds); a "
                  "subfolder's name (folder)",
    'pp_train': 'training preprocessing ops, "op(args)|op(args)|..." (preprocess_ops)',
    'pp_eval': 'evaluation preprocessing ops (deterministic)',
    'mixup_alpha': 'mixup Beta(alpha, alpha), in the train step (train/batch_mix.py); 0 '
                   'disables; needs onehot in pp_train',
    'cutmix_alpha': 'cutmix Beta(alpha, alpha), in the train step; 0 disables',
    'mix_switch_prob': 'with both enabled: probability of cutmix instead of mixup per batch',
    'shuffle_buffer': 'tfds shuffle buffer (examples); image folders shuffle exactly',
    'threads': 'tf.data threads per process; None lets tf.data decide',
}


def default_input_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.source = 'tfds'
  c.name = 'bundled_mnist'
  c.data_dir = ml_collections.FieldReference(None, field_type=str)
  c.folder = ml_collections.FieldReference(None, field_type=str)
  c.train_split = 'train'
  c.eval_split = 'test'
  c.pp_train = 'decode|resize(32)|flip_lr|value_range(-1, 1)|onehot(10)'
  c.pp_eval = 'decode|resize(32)|value_range(-1, 1)|onehot(10)'
  c.mixup_alpha = 0.0
  c.cutmix_alpha = 0.0
  c.mix_switch_prob = 0.5
  c.shuffle_buffer = 50_000
  c.threads = ml_collections.FieldReference(None, field_type=int)
  return c
