"""Image files given on the command line (predict, visualize): folders are read as
training reads a class folder."""

import io
import pathlib

import pytest

from vit_jax import image_files


def test_folders_leave_out_hidden_and_system_entries_and_read_album_folders(tmp_path):
  """`.ipynb_checkpoints/x.jpg` was predicted, macOS's `._0.jpg` read (and failed, exit
  1), and a folder named `album.jpg` reported as an image file that is not one."""
  def touch(rel):
    path = tmp_path / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b'x')
  for rel in ('dog/0.jpg', 'dog/._0.jpg', 'dog/.ipynb_checkpoints/0-checkpoint.jpg',
              'dog/__MACOSX/1.jpg', 'dog/album.jpg/2.PNG', 'dog/notes.txt', 'dog/sub/3.gif',
              'cat/4.bmp'):
    touch(rel)
  (tmp_path / 'dog' / 'loop').symlink_to('..')   # back up the tree: not read twice
  (tmp_path / 'dog' / 'sub' / 'again').symlink_to('../sub')
  got = [str(p.relative_to(tmp_path)) for p in image_files.expand_images([tmp_path / 'dog'])]
  assert got == ['dog/0.jpg', 'dog/album.jpg/2.PNG', 'dog/sub/3.gif'], got  # not ../cat
  # A file given by name is taken as it is (hidden or not); a missing one is named.
  assert image_files.expand_images([tmp_path / 'dog' / '._0.jpg']) == [
      tmp_path / 'dog' / '._0.jpg']
  with pytest.raises(FileNotFoundError, match='no such image file or folder: .*nope'):
    image_files.expand_images([tmp_path / 'nope'])
  (tmp_path / 'empty' / '.hidden').mkdir(parents=True)
  touch('empty/.hidden/5.jpg')
  with pytest.raises(ValueError, match=r'no images \(.jpg'):
    image_files.paths_from_args([tmp_path / 'empty'])
  assert isinstance(got, list) and all(isinstance(p, pathlib.Path)
                                       for p in image_files.folder_images(tmp_path))


def test_decoder_errors_lose_tensorflows_op_plumbing():
  """Skipped images were named with '{{function_node __wrapped__DecodeImage_device_/job:
  localhost/replica:0/task:0/device:CPU:0}} ... [Op:DecodeImage] name:'."""
  tf = pytest.importorskip('tensorflow')
  for data, want in ((b'', 'Input is empty.'),
                     (b'\x89PNG\r\n\x1a\n' + b'0' * 20, 'Invalid PNG. Failed to initialize decoder.')):
    with pytest.raises(tf.errors.InvalidArgumentError) as e:
      tf.io.decode_image(data, channels=3, expand_animations=False)
    assert image_files.decoder_error(e.value.message) == want
    assert image_files.decoder_error(e.value.message + ' name: ') == want
  assert image_files.decoder_error('no image file x.png') == 'no image file x.png'
  # A check of the decode op's own (an animated WebP without alpha): its text alone.
  from vit_jax.data import preprocess_ops  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  frames = [Image.new('RGB', (4, 4), (v, v, v)) for v in (10, 200)]
  buf = io.BytesIO()
  frames[0].save(buf, 'WEBP', save_all=True, append_images=frames[1:])
  with pytest.raises(tf.errors.InvalidArgumentError) as e:
    preprocess_ops.decode_other(tf.constant(buf.getvalue()))
  assert image_files.decoder_error(e.value.message).startswith(
      'an animated WebP without alpha, which TensorFlow cannot decode: convert it')


def test_a_16_bit_pil_image_reads_as_its_file_does():
  """PIL's convert('RGB') clips 16-bit grey values to 255: the same picture as a PIL image
  was almost white, as a file TensorFlow's decoder keeps the high byte."""
  import io  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  tf = pytest.importorskip('tensorflow')
  grey = np.arange(0, 65536, 97, dtype=np.uint16)[:600].reshape(20, 30)
  buf = io.BytesIO()
  Image.fromarray(grey).save(buf, format='PNG')
  image = Image.open(io.BytesIO(buf.getvalue()))
  assert image.mode == 'I;16'
  from_file = tf.io.decode_image(buf.getvalue(), channels=3, expand_animations=False).numpy()
  np.testing.assert_array_equal(image_files.read_image(image), from_file)
  np.testing.assert_array_equal(image_files.read_image(image.convert('I')), from_file)
  # 8-bit values in a 32-bit 'I' image are 8-bit values (not shifted to black).
  eight = Image.fromarray(np.full((4, 4), 200, np.uint8)).convert('I')
  assert (image_files.read_image(eight) == 200).all()
