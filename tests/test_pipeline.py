"""The tf.data chain: element specs, static batch shapes, shuffling, options."""

import numpy as np
import pytest
import tensorflow as tf

from effpipe.data import pipeline


def _arrays(count=50, size=8):
    images = np.arange(count, dtype=np.uint8).reshape(count, 1, 1, 1)
    return np.broadcast_to(images, (count, size, size, 3)).copy(), np.arange(count)


def test_training_batches_are_uint8_static_and_full():
    images, labels = _arrays()
    dataset = pipeline.make_dataset(images, labels, batch_size=16, is_training=True)
    image_spec, label_spec = dataset.element_spec
    assert image_spec == tf.TensorSpec((16, 8, 8, 3), tf.uint8)
    assert label_spec == tf.TensorSpec((16,), tf.int32)
    # 50 examples at batch 16: three full batches per pass, the remainder dropped,
    # and the stream goes on (the trainer sets steps_per_epoch).
    passes = _epochs(dataset, steps_per_epoch=3, epochs=2)
    assert [len(set(epoch)) for epoch in passes] == [48, 48]


def _epochs(dataset, steps_per_epoch, epochs):
    """Label sequences of consecutive epochs of an endless training stream."""
    labels = [batch[1] for batch in dataset.take(steps_per_epoch * epochs).as_numpy_iterator()]
    return [
        np.concatenate(labels[index * steps_per_epoch : (index + 1) * steps_per_epoch])
        for index in range(epochs)
    ]


def test_evaluation_keeps_order_and_the_last_partial_batch():
    images, labels = _arrays()
    dataset = pipeline.make_dataset(images, labels, batch_size=16, is_training=False)
    assert dataset.element_spec[0].shape.as_list() == [None, 8, 8, 3]
    seen = np.concatenate([batch[1] for batch in dataset.as_numpy_iterator()])
    np.testing.assert_array_equal(seen, labels)


def test_each_epoch_reshuffles_and_images_follow_labels():
    images, labels = _arrays()
    dataset = pipeline.make_dataset(images, labels, batch_size=10, is_training=True, seed=1)
    first, second = _epochs(dataset, steps_per_epoch=5, epochs=2)
    assert sorted(first) == sorted(second) == list(range(50))
    assert not np.array_equal(first, second)
    for batch_images, batch_labels in dataset.take(10).as_numpy_iterator():
        np.testing.assert_array_equal(batch_images[:, 0, 0, 0], batch_labels)


def test_a_fresh_stream_skipping_k_epochs_continues_an_uninterrupted_one():
    # What resuming relies on: epoch k of a new stream from the same seed, after
    # skipping k epochs, equals epoch k of one stream read from the start, even
    # after other streams were read in this process.
    images, labels = _arrays()

    def stream():
        return pipeline.make_dataset(images, labels, batch_size=10, is_training=True, seed=3)

    uninterrupted = _epochs(stream(), steps_per_epoch=5, epochs=4)
    _epochs(stream(), steps_per_epoch=5, epochs=2)
    resumed = _epochs(stream().skip(2 * 5), steps_per_epoch=5, epochs=2)
    np.testing.assert_array_equal(np.stack(resumed), np.stack(uninterrupted[2:]))


def test_same_seed_gives_the_same_order():
    images, labels = _arrays()

    def order(seed):
        dataset = pipeline.make_dataset(images, labels, batch_size=10, is_training=True, seed=seed)
        return np.concatenate(_epochs(dataset, steps_per_epoch=5, epochs=2))

    np.testing.assert_array_equal(order(5), order(5))
    assert not np.array_equal(order(5), order(6))


def test_options_reach_tf_data():
    images, labels = _arrays()
    options = pipeline.PipelineOptions(deterministic=True, autotune=False, threads=2)
    dataset = pipeline.make_dataset(
        images, labels, batch_size=10, is_training=True, options=options
    )
    applied = dataset.options()
    assert applied.deterministic is True
    assert applied.autotune.enabled is False
    assert applied.threading.private_threadpool_size == 2


def test_float_images_are_refused():
    images, labels = _arrays()
    with pytest.raises(ValueError, match="uint8"):
        pipeline.make_dataset(images.astype(np.float32), labels, batch_size=10, is_training=True)


def test_features_stream_in_the_order_their_images_would():
    # Phase 1 on cached features relies on it: the same seed, the same examples,
    # the same batches, epoch after epoch, features following their labels.
    images, labels = _arrays()
    features = np.stack([labels, -labels], axis=1).astype(np.float32)
    image_stream = pipeline.make_dataset(images, labels, batch_size=10, is_training=True, seed=5)
    feature_stream = pipeline.make_feature_dataset(
        features, labels, batch_size=10, is_training=True, seed=5
    )
    assert feature_stream.element_spec[0] == tf.TensorSpec((10, 2), tf.float32)
    np.testing.assert_array_equal(
        np.stack(_epochs(feature_stream, steps_per_epoch=5, epochs=3)),
        np.stack(_epochs(image_stream, steps_per_epoch=5, epochs=3)),
    )
    for batch_features, batch_labels in feature_stream.take(5).as_numpy_iterator():
        np.testing.assert_array_equal(batch_features[:, 0], batch_labels)
    validation = pipeline.make_feature_dataset(features, labels, batch_size=16, is_training=False)
    seen = np.concatenate([batch[1] for batch in validation.as_numpy_iterator()])
    np.testing.assert_array_equal(seen, labels)
