"""Model, training loops and parameter exchange of flower_tutorial.task."""

import copy
import random

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from flower_tutorial import task
from flower_tutorial.task import (
    Net,
    TensorLoader,
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
    with pytest.raises(ValueError) as err:
        train(Net(), empty, epochs=1, learning_rate=0.001, device=CPU)
    assert str(err.value) == "train() got an empty trainloader: nothing to train on."
    with pytest.raises(ValueError) as err:
        task.test(Net(), empty, CPU)
    assert str(err.value) == "test() got an empty testloader: nothing to evaluate."


def _tiny_batches() -> list[dict]:
    """Two batches of different sizes (3 and 1) for a 4-feature, 3-class model."""
    generator = torch.Generator().manual_seed(5)
    images = torch.randn(4, 4, generator=generator)
    labels = torch.tensor([0, 2, 1, 2])
    return [
        {"img": images[:3], "label": labels[:3]},
        {"img": images[3:], "label": labels[3:]},
    ]


def _train_by_hand(
    net: nn.Module, batches: list[dict], epochs: int, lr: float, mu: float
) -> float:
    """train() written out: Adam steps, then the mean cross-entropy per sample.

    Each gradient gets mu * (w - w0) by hand: the gradient of the proximal term
    mu / 2 * ||w - w0||^2 that train() leaves to autograd.
    """
    optimizer = torch.optim.Adam(net.parameters(), lr=lr)
    start = [p.detach().clone() for p in net.parameters()]
    weighted, count = 0.0, 0
    for _ in range(epochs):
        for batch in batches:
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(net(batch["img"]), batch["label"])
            loss.backward()
            with torch.no_grad():
                for w, w0 in zip(net.parameters(), start, strict=True):
                    w.grad += mu * (w - w0)
            optimizer.step()
            weighted += loss.item() * len(batch["label"])
            count += len(batch["label"])
    return weighted / count


@pytest.mark.parametrize("mu", [0.0, 2.0])
def test_train_takes_adam_steps_and_returns_the_mean_cross_entropy_per_sample(mu):
    # With mu > 0 (FedProx) the loss also holds mu / 2 * ||w - w0||^2, whose
    # gradient is mu * (w - w0); the returned loss is the cross-entropy alone.
    torch.manual_seed(4)
    net = nn.Linear(4, 3)
    reference = copy.deepcopy(net)
    batches = _tiny_batches()
    loss = train(net, batches, epochs=3, learning_rate=0.1, device=CPU, proximal_mu=mu)
    expected = _train_by_hand(reference, batches, epochs=3, lr=0.1, mu=mu)
    assert loss == pytest.approx(expected, rel=1e-6)
    for got, want in zip(net.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)


class _Logits(nn.Module):
    """A "model" whose inputs are its logits."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def test_accuracy_counts_correct_predictions_exactly_past_float32s_range():
    # 2**24 + 1 correct predictions: a float32 count would stop at 2**24.
    big = {"img": torch.zeros(2**22, 1), "label": torch.zeros(2**22, dtype=torch.long)}
    one = {"img": torch.zeros(1, 1), "label": torch.zeros(1, dtype=torch.long)}
    loss, accuracy = task.test(_Logits(), [big, big, big, big, one], CPU)
    assert (loss, accuracy) == (0.0, 1.0)


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
    with pytest.raises(
        ValueError, match=r"^Net has 10 state_dict entries, got 9 arrays\.$"
    ):
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


def test_set_seed_seeds_python_numpy_and_torch_from_the_mixed_integers():
    def draws() -> tuple[float, float, float]:
        return random.random(), float(np.random.random()), torch.rand(()).item()

    set_seed(42, 3, 1)
    first = draws()
    assert torch.initial_seed() == int(
        np.random.SeedSequence([42, 3, 1]).generate_state(1)[0]
    )
    set_seed(42, 3, 1)
    assert draws() == first
    set_seed(42, 3, 2)
    assert all(a != b for a, b in zip(draws(), first, strict=True))


def test_set_seed_makes_cudnn_choose_deterministic_algorithms(monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", False)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", True)
    set_seed(0)
    assert torch.backends.cudnn.deterministic is True
    assert torch.backends.cudnn.benchmark is False


def test_shuffling_draws_the_order_on_the_datas_own_device():
    # A script may make another device the default (torch.set_default_device)
    # while the data stays on the CPU; "meta" stands in for a GPU here.
    labels = torch.arange(10)
    images = torch.zeros(10, 3, 2, 2, dtype=torch.uint8)
    loader = TensorLoader(images, labels, batch_size=4, shuffle=True)
    torch.manual_seed(3)
    with torch.device("meta"):
        drawn = torch.cat([batch["label"] for batch in loader])
    torch.manual_seed(3)
    assert torch.equal(drawn, torch.randperm(10))  # the CPU generator's order


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
