import torch
import torch.nn.functional as F

from segshift.components.losses import labelled_cross_entropy


def test_labelled_cross_entropy_is_torch_mean_over_labelled_pixels():
    torch.manual_seed(0)
    logits = torch.randn(2, 19, 4, 5)
    labels = torch.randint(0, 19, (2, 4, 5))
    labels[0, 0] = 255
    expected = F.cross_entropy(logits, labels, ignore_index=255)
    assert torch.allclose(labelled_cross_entropy(logits, labels), expected)


def test_a_batch_with_every_pixel_ignored_gives_zero_loss_with_a_graph_not_nan():
    logits = torch.randn(2, 19, 4, 5, requires_grad=True)
    loss = labelled_cross_entropy(logits, torch.full((2, 4, 5), 255))
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))
