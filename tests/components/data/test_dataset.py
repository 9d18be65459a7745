import numpy as np

from segshift.components.data.dataset import StepBatchSampler, random_crop_flip


def test_global_batch_does_not_depend_on_worker_count():
    one = StepBatchSampler(10, 4, seed=0, stream=0, start_step=0, total_steps=5)
    ranks = [StepBatchSampler(10, 4, 0, 0, 0, 5, rank=r, world_size=2) for r in (0, 1)]
    for step_one, step_r0, step_r1 in zip(one, *ranks):
        assert sorted(step_one) == sorted(step_r0 + step_r1)


def test_resuming_a_sampler_gives_the_remaining_batches():
    full = list(StepBatchSampler(7, 3, 1, 0, 0, 6))
    assert list(StepBatchSampler(7, 3, 1, 0, 4, 6)) == full[4:]


def test_each_epoch_visits_every_sample_once():
    sampler = StepBatchSampler(8, 4, 2, 0, 0, 2)
    assert sorted(i for batch in sampler for i, _ in batch) == list(range(8))


def test_crop_and_flip_keep_image_and_label_aligned():
    image = np.arange(6 * 8 * 3, dtype=np.uint8).reshape(6, 8, 3)
    label = image[..., 0].copy()
    for seed in range(10):
        img, lab = random_crop_flip(image, label, (4, 5), True, np.random.default_rng(seed))
        assert img.shape == (4, 5, 3) and np.array_equal(img[..., 0], lab)


def test_crop_larger_than_image_pads_label_with_ignore():
    image = np.zeros((2, 2, 3), np.uint8)
    _, lab = random_crop_flip(image, np.zeros((2, 2), np.uint8), (3, 3), False, np.random.default_rng(0))
    assert lab.shape == (3, 3) and (lab[2] == 255).all() and (lab[:, 2] == 255).all()
