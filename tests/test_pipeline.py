"""The tf.data chain: element specs, static batch shapes, shuffling, options."""

import numpy as np
import pytest
import tensorflow as tf

from effpipe.data import pipeline, splits, stores


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


def test_a_stream_started_at_epoch_k_yields_epoch_k_of_one_started_at_0():
    # What resuming relies on: epoch k's order is drawn from (seed, k) alone, so a
    # stream built at k continues an uninterrupted one, even after other streams
    # were read in this process.
    images, labels = _arrays()

    def stream(initial_epoch=0):
        return pipeline.make_dataset(
            images, labels, batch_size=10, is_training=True, seed=3, initial_epoch=initial_epoch
        )

    uninterrupted = _epochs(stream(), steps_per_epoch=5, epochs=4)
    _epochs(stream(), steps_per_epoch=5, epochs=2)
    resumed = _epochs(stream(initial_epoch=2), steps_per_epoch=5, epochs=2)
    np.testing.assert_array_equal(np.stack(resumed), np.stack(uninterrupted[2:]))


def test_an_epoch_holds_exactly_its_batches_and_replica_batches_cut_the_global_ones():
    # 50 examples, 3 steps of 10 per epoch: each epoch draws 30 distinct examples
    # of its own order. Two replicas taking 5 each per step (6 batches of 5 per
    # epoch) see the same steps, as a mirrored run sees one device's.
    images, labels = _arrays()

    def stream(batch_size, batches_per_epoch):
        return pipeline.make_dataset(
            images,
            labels,
            batch_size=batch_size,
            is_training=True,
            seed=4,
            batches_per_epoch=batches_per_epoch,
        )

    global_epochs = _epochs(stream(10, 3), steps_per_epoch=3, epochs=3)
    assert [len(set(epoch)) for epoch in global_epochs] == [30, 30, 30]
    assert len({tuple(epoch) for epoch in global_epochs}) == 3
    replica_epochs = _epochs(stream(5, 6), steps_per_epoch=6, epochs=3)
    np.testing.assert_array_equal(np.stack(replica_epochs), np.stack(global_epochs))
    with pytest.raises(ValueError, match="lower the batch size"):
        stream(10, 6)


def _png_files(folder, count):
    """`count` 4x4 PNG files, file i all of value i."""
    paths = []
    for index in range(count):
        path = str(folder / f"{index:03d}.png")
        pixels = tf.fill((4, 4, 3), tf.constant(index, tf.uint8))
        tf.io.write_file(path, tf.io.encode_png(pixels))
        paths.append(path)
    return tuple(paths)


def test_a_resumed_file_stream_reads_only_the_files_it_yields(tmp_path, monkeypatch):
    # --cache=off resumed at epoch 5: the files of epochs 0-4 are not read again,
    # and the batches are epoch 5's of an uninterrupted stream.
    read = []
    plain_fetch = stores.fetch

    def counted_fetch(store):
        fetch = plain_fetch(store)

        def fetch_and_count(path):
            path = tf.numpy_function(lambda p: read.append(p) or p, [path], tf.string)
            return fetch(tf.ensure_shape(path, ()))

        return fetch_and_count

    monkeypatch.setattr(stores, "fetch", counted_fetch)
    count, batch_size = 48, 4
    store = stores.FileStore(_png_files(tmp_path, count), size=4, crop="resize")
    split = splits.Split(store, np.arange(count))

    def first_batches(initial_epoch, batches):
        dataset = pipeline.make_dataset(
            split, batch_size=batch_size, is_training=True, seed=2, initial_epoch=initial_epoch
        )
        return list(dataset.take(batches).as_numpy_iterator())

    resumed = first_batches(5, 2)
    # Two batches yielded; the parallel reads and the prefetch read ahead a few
    # files, never an epoch (48), let alone the 240 files of five replayed ones.
    assert batch_size * 2 <= len(read) < count
    for images, labels in resumed:
        np.testing.assert_array_equal(images[:, 0, 0, 0], labels)
    uninterrupted = first_batches(0, 5 * count // batch_size + 2)[-2:]
    for (_, resumed_labels), (_, labels) in zip(resumed, uninterrupted, strict=True):
        np.testing.assert_array_equal(resumed_labels, labels)


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
