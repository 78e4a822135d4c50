"""Input pipelines: sources (tfds, image folders, bundled MNIST), preprocessing, batches.

    from vit_jax import data
    train = data.sources.ImageFolderSource(root='/data/pets', split='train')
    pp = data.preprocess_ops.parse('decode|inception_crop(224)|flip_lr|value_range(-1, 1)|'
                                   f'onehot({train.num_classes})')
    for batch in data.pipeline.train_batches(train, global_batch_size=512, preprocess=pp,
                                             seed=0, start_step=step):
      ...
"""
