"""One of two processes checking an image folder together (test_sources.py).

Run as `python folder_check_run.py ROOT CACHE_DIR PORT PROCESS_ID`; prints one JSON line
with the files this process decoded and the skipped files it ended with.
"""

import json
import sys

import jax

jax.config.update('jax_cpu_collectives_implementation', 'gloo')

from vit_jax.data import sources  # pylint: disable=g-import-not-at-top,wrong-import-position


def main():
  root, cache_dir, port, process_id = sys.argv[1:5]
  jax.distributed.initialize(coordinator_address=f'localhost:{port}', num_processes=2,
                             process_id=int(process_id))
  decoded = []
  check = sources._check_image  # pylint: disable=protected-access

  def counting_check(path):
    decoded.append(path)
    return check(path)

  sources._check_image = counting_check  # pylint: disable=protected-access
  src = sources.ImageFolderSource(root=root, split='train', cache_dir=cache_dir)
  print('RESULT ' + json.dumps({'decoded': sorted(decoded), 'skipped': src.skipped,
                                'paths': [str(p) for p in src.paths]}), flush=True)
  jax.distributed.shutdown()


if __name__ == '__main__':
  main()
