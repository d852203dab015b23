"""The tf.data chain: element specs, static batch shapes, shuffling, options."""

import numpy as np
import pytest
import tensorflow as tf

from effpipe import input_pipeline


def _arrays(count=50, size=8):
    images = np.arange(count, dtype=np.uint8).reshape(count, 1, 1, 1)
    return np.broadcast_to(images, (count, size, size, 3)).copy(), np.arange(count)


def test_training_batches_are_uint8_static_and_full():
    images, labels = _arrays()
    dataset = input_pipeline.make_dataset(images, labels, batch_size=16, is_training=True)
    image_spec, label_spec = dataset.element_spec
    assert image_spec == tf.TensorSpec((16, 8, 8, 3), tf.uint8)
    assert label_spec == tf.TensorSpec((16,), tf.int32)
    batches = list(dataset.as_numpy_iterator())
    # 50 examples at batch 16: three full batches, the remainder dropped.
    assert [len(batch[1]) for batch in batches] == [16, 16, 16]


def test_evaluation_keeps_order_and_the_last_partial_batch():
    images, labels = _arrays()
    dataset = input_pipeline.make_dataset(images, labels, batch_size=16, is_training=False)
    assert dataset.element_spec[0].shape.as_list() == [None, 8, 8, 3]
    seen = np.concatenate([batch[1] for batch in dataset.as_numpy_iterator()])
    np.testing.assert_array_equal(seen, labels)


def test_each_epoch_reshuffles_and_images_follow_labels():
    images, labels = _arrays()
    dataset = input_pipeline.make_dataset(images, labels, batch_size=10, is_training=True, seed=1)
    first = np.concatenate([batch[1] for batch in dataset.as_numpy_iterator()])
    second = np.concatenate([batch[1] for batch in dataset.as_numpy_iterator()])
    assert sorted(first) == sorted(second) == list(range(50))
    assert not np.array_equal(first, second)
    for batch_images, batch_labels in dataset.as_numpy_iterator():
        np.testing.assert_array_equal(batch_images[:, 0, 0, 0], batch_labels)


def test_same_seed_gives_the_same_order():
    images, labels = _arrays()

    def order(seed):
        dataset = input_pipeline.make_dataset(
            images, labels, batch_size=10, is_training=True, seed=seed
        )
        return np.concatenate([batch[1] for batch in dataset.as_numpy_iterator()])

    np.testing.assert_array_equal(order(5), order(5))
    assert not np.array_equal(order(5), order(6))


def test_options_reach_tf_data():
    images, labels = _arrays()
    options = input_pipeline.PipelineOptions(deterministic=True, autotune=False, threads=2)
    dataset = input_pipeline.make_dataset(
        images, labels, batch_size=10, is_training=True, options=options
    )
    applied = dataset.options()
    assert applied.deterministic is True
    assert applied.autotune.enabled is False
    assert applied.threading.private_threadpool_size == 2


def test_float_images_are_refused():
    images, labels = _arrays()
    with pytest.raises(ValueError, match="uint8"):
        input_pipeline.make_dataset(
            images.astype(np.float32), labels, batch_size=10, is_training=True
        )
