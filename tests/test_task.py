"""Model, training loops and parameter exchange of flower_tutorial.task."""

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from flower_tutorial import task
from flower_tutorial.task import (
    Net,
    get_device,
    get_parameters,
    set_parameters,
    set_seed,
    train,
)

CPU = torch.device("cpu")


class _TensorDicts(Dataset):
    """Samples shaped like the app's batches: {"img": tensor, "label": int}."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        return {"img": self.images[i], "label": self.labels[i]}


def _learnable_loader(num: int = 64, batch_size: int = 16) -> DataLoader:
    """Each class is a constant colour plus noise, so a few steps can fit it."""
    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(num) % 10
    colours = torch.rand(10, 3, 1, 1, generator=generator) * 2 - 1
    noise = 0.1 * torch.randn(num, 3, 32, 32, generator=generator)
    images = colours[labels] + noise
    return DataLoader(_TensorDicts(images, labels), batch_size=batch_size)


def test_net_maps_images_to_ten_logits():
    net = Net()
    assert net(torch.zeros(4, 3, 32, 32)).shape == (4, 10)
    assert sum(p.numel() for p in net.parameters()) == 62006  # the tutorial's CNN


def test_train_lowers_the_loss():
    set_seed(0)
    net, loader = Net(), _learnable_loader()
    before, _ = task.test(net, loader, CPU)
    train_loss = train(net, loader, epochs=10, learning_rate=0.01, device=CPU)
    after, accuracy = task.test(net, loader, CPU)
    assert after < before / 2
    assert accuracy > 0.5
    assert 0 < train_loss < before


def test_test_returns_mean_loss_and_accuracy():
    set_seed(1)
    net, loader = Net(), _learnable_loader(num=40, batch_size=16)
    loss, accuracy = task.test(net, loader, CPU)
    # Reference: one pass over the whole set at once.
    images = torch.cat([b["img"] for b in loader])
    labels = torch.cat([b["label"] for b in loader])
    with torch.no_grad():
        outputs = net(images)
    expected_loss = nn.functional.cross_entropy(outputs, labels).item()
    expected_acc = (outputs.argmax(1) == labels).float().mean().item()
    assert loss == pytest.approx(expected_loss, rel=1e-5)
    assert accuracy == pytest.approx(expected_acc)
    assert 0.0 <= accuracy <= 1.0


def test_empty_loaders_are_refused():
    empty = DataLoader(_TensorDicts(torch.zeros(0, 3, 32, 32), torch.zeros(0)))
    with pytest.raises(ValueError, match="empty trainloader"):
        train(Net(), empty, epochs=1, learning_rate=0.001, device=CPU)
    with pytest.raises(ValueError, match="empty testloader"):
        task.test(Net(), empty, CPU)


def _model_with_integer_buffer() -> nn.Module:
    # BatchNorm's num_batches_tracked is int64: the tutorial's torch.Tensor(v)
    # would turn it into float32.
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten())


def test_parameters_round_trip_bit_exactly_with_dtypes():
    set_seed(2)
    source = _model_with_integer_buffer()
    source.train()
    source(torch.randn(8, 3, 8, 8))  # moves running stats and the int counter
    sent = get_parameters(source)
    target = _model_with_integer_buffer()
    set_parameters(target, sent)
    received = get_parameters(target)
    assert [a.dtype for a in received] == [a.dtype for a in sent]
    assert any(a.dtype == np.int64 for a in received)
    for a, b in zip(sent, received, strict=True):
        assert a.tobytes() == b.tobytes()
    for (key, value), array in zip(target.state_dict().items(), sent, strict=True):
        assert value.dtype == source.state_dict()[key].dtype
        assert torch.equal(value, torch.from_numpy(array))


def test_get_parameters_returns_copies():
    net = Net()
    arrays = get_parameters(net)
    snapshot = [a.copy() for a in arrays]
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)
    for a, b in zip(arrays, snapshot, strict=True):
        np.testing.assert_array_equal(a, b)


def test_set_parameters_refuses_a_wrong_count_or_shape():
    net = Net()
    arrays = get_parameters(net)
    with pytest.raises(ValueError, match="has 10 state_dict entries, got 9"):
        set_parameters(net, arrays[:-1])
    arrays[0] = np.zeros((1, 2, 3), dtype=np.float32)
    with pytest.raises(RuntimeError, match="size mismatch"):
        set_parameters(net, arrays)


def test_same_seed_gives_the_same_model():
    set_seed(7)
    first = get_parameters(Net())
    set_seed(7)
    second = get_parameters(Net())
    set_seed(8)
    third = get_parameters(Net())
    assert all(np.array_equal(a, b) for a, b in zip(first, second, strict=True))
    assert not np.array_equal(first[0], third[0])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_training_and_parameter_exchange_on_cuda():
    cuda = torch.device("cuda")
    set_seed(3)
    net, loader = Net(), _learnable_loader()
    train(net, loader, epochs=10, learning_rate=0.01, device=cuda)
    assert all(p.is_cuda for p in net.parameters())
    loss, accuracy = task.test(net, loader, cuda)
    assert accuracy > 0.5
    # What the client sends: CPU arrays, whatever device trained them.
    sent = get_parameters(net)
    assert all(isinstance(a, np.ndarray) and a.dtype == np.float32 for a in sent)
    on_gpu, on_cpu = Net().to(cuda), Net()
    set_parameters(on_gpu, sent)
    set_parameters(on_cpu, sent)
    assert all(p.is_cuda for p in on_gpu.parameters())
    assert task.test(on_gpu, loader, cuda) == (loss, accuracy)
    cpu_loss, cpu_accuracy = task.test(on_cpu, loader, CPU)
    assert cpu_loss == pytest.approx(loss, rel=1e-4)
    assert cpu_accuracy == accuracy


def test_device_is_cuda_only_when_present(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert get_device().type == "cuda"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert get_device().type == "cpu"
