import numpy as np
import pytest
import torch

from ray_fedat.data import (DataError, augment_batch, data_digest, hold_out_validation, load_digits, load_npz,
                            load_torchvision)


def test_digits_loads_as_uint8_with_a_fixed_split():
    a, b = load_digits(), load_digits()
    assert a.x_train.dtype == torch.uint8 and a.x_train.shape[1:] == (1, 8, 8)
    assert len(a.y_train) + len(a.y_test) == 1797
    assert torch.equal(a.y_test, b.y_test) and torch.equal(a.x_train, b.x_train)
    assert int(a.x_train.max()) == 255


def test_the_nodes_data_check_sees_the_images_not_only_the_labels():
    import dataclasses

    data = hold_out_validation(load_digits(), 0.1, 0)
    assert data_digest(data) == data_digest(hold_out_validation(load_digits(), 0.1, 0))
    same_labels = [
        data.x_train.flip(-1),                                  # mirrored images
        data.x_train // 2,                                      # another scaling
        data.x_train[torch.randperm(len(data.y_train), generator=torch.Generator().manual_seed(0))],  # reordered
    ]
    for x in same_labels:
        assert data_digest(dataclasses.replace(data, x_train=x)) != data_digest(data)
    assert data_digest(dataclasses.replace(data, x_test=data.x_test[:, :, :7])) != data_digest(data)  # a shape
    assert data_digest(dataclasses.replace(data, y_train=data.y_train.roll(1))) != data_digest(data)


def test_npz_from_the_real_mnist_test_set(mnist_npz):
    data = load_npz(mnist_npz)
    assert data.x_train.shape == (8000, 1, 28, 28) and data.x_test.shape == (2000, 1, 28, 28)
    assert data.num_classes == 10 and data.x_train.dtype == torch.uint8
    assert sorted(torch.unique(data.y_train).tolist()) == list(range(10))


def write_npz(path, **arrays):
    np.savez(path, **arrays)
    return str(path)


def good_arrays():
    rng = np.random.default_rng(0)
    return dict(x_train=rng.integers(0, 256, (20, 6, 6), dtype=np.uint8), y_train=rng.integers(0, 3, 20),
                x_test=rng.integers(0, 256, (5, 6, 6), dtype=np.uint8), y_test=rng.integers(0, 3, 5))


def test_npz_colour_images_become_channels_first(tmp_path):
    arrays = good_arrays()
    arrays["x_train"] = np.zeros((20, 6, 6, 3), np.uint8)
    arrays["x_test"] = np.zeros((5, 6, 6, 3), np.uint8)
    assert load_npz(write_npz(tmp_path / "c.npz", **arrays)).shape == (3, 6, 6)


@pytest.mark.parametrize("change, message", [
    (lambda a: a.pop("y_test"), "missing array(s) y_test"),
    (lambda a: a.update(x_train=a["x_train"].astype(np.float32)), "must be uint8"),
    (lambda a: a.update(y_test=a["y_test"] + 5), "that no training image has"),
    (lambda a: a.update(y_test=-a["y_test"] - 1), "that no training image has"),
    (lambda a: a.update(y_train=a["y_train"] + 100, y_test=a["y_test"] + 100), "relabel them to 0..2"),
    (lambda a: a.update(y_train=np.where(a["y_train"] == 1, 0, a["y_train"])), "class(es) 1 have no training image"),
    (lambda a: a.update(y_train=a["y_train"] - 1), "the smallest is -1"),
    (lambda a: a.update(y_train=a["y_train"][:10]), "has 20 images but y_train has 10 labels"),
    (lambda a: a.update(x_test=np.zeros((5, 7, 7), np.uint8)), "x_test images are"),
    (lambda a: a.update(y_train=a["y_train"].astype(np.float64)), "1-D integer array"),
])
def test_malformed_npz_files_give_one_line_errors(tmp_path, change, message):
    arrays = good_arrays()
    change(arrays)
    with pytest.raises(DataError) as e:
        load_npz(write_npz(tmp_path / "bad.npz", **arrays))
    assert message in str(e.value) and "\n" not in str(e.value)


def test_not_a_zip_gives_one_line_error(tmp_path):
    path = tmp_path / "junk.npz"
    path.write_bytes(b"this is not a zip archive at all")
    with pytest.raises(DataError, match="not a readable .npz"):
        load_npz(str(path))


def test_missing_torchvision_data_without_download_names_dir_and_files(tmp_path):
    with pytest.raises(DataError) as e:
        load_torchvision("mnist", str(tmp_path), download=False)
    assert str(tmp_path) in str(e.value) and "train-images-idx3-ubyte" in str(e.value) and "--download" in str(e.value)


def test_batched_augmentation_crops_and_flips_within_the_padded_image():
    x = torch.rand(64, 3, 32, 32)
    out = augment_batch(x, torch.Generator().manual_seed(0))
    assert out.shape == x.shape
    assert not torch.equal(out, x)
    # every output is a shifted (and maybe flipped) window of the zero-padded input
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
    for i in range(4):
        found = any(torch.equal(out[i], w) or torch.equal(out[i], w.flip(2))
                    for dy in range(9) for dx in range(9) for w in [padded[i, :, dy:dy + 32, dx:dx + 32]])
        assert found


def test_labels_100_to_109_would_have_trained_a_110_class_model_and_are_refused(tmp_path):
    arrays = good_arrays()
    arrays["y_train"] = np.arange(20) % 10 + 100
    arrays["y_test"] = np.arange(5)
    with pytest.raises(DataError, match=r"found 10 distinct labels in \[100, 109\].*relabel them to 0..9"):
        load_npz(write_npz(tmp_path / "shifted.npz", **arrays))


def test_validation_is_held_out_of_training_reproducibly():
    data = load_digits()
    a, b = hold_out_validation(data, 0.1, seed=3), hold_out_validation(data, 0.1, seed=3)
    n = len(data.y_train)
    assert len(a.y_val) == round(0.1 * n) and len(a.y_train) + len(a.y_val) == n
    assert torch.equal(a.x_val, b.x_val) and torch.equal(a.y_train, b.y_train)
    assert not torch.equal(hold_out_validation(data, 0.1, seed=4).y_val, a.y_val)
    # every training image ends up in exactly one of the two, and the test set is untouched
    train_and_val = torch.cat([a.x_train, a.x_val]).flatten(1)
    assert sorted(map(bytes, train_and_val.numpy())) == sorted(map(bytes, data.x_train.flatten(1).numpy()))
    assert torch.equal(a.x_test, data.x_test)
    assert hold_out_validation(data, 0.0, seed=3) is data


def test_a_validation_set_that_leaves_nothing_to_train_on_is_refused():
    data = load_digits()
    tiny = type(data)(data.x_train[:2], data.y_train[:2], data.x_test, data.y_test, 10)
    with pytest.raises(DataError, match="--val-fraction 0.1 of 2 training images leaves 1 to train on"):
        hold_out_validation(tiny, 0.1, seed=0)
