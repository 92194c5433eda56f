"""The CUDA paths: bf16 autocast + channels_last training of every CNN and sequence model, augmentation on the device, resume.
Skipped where no GPU is present (CI); run them on a GPU machine with `pytest tests/test_cuda.py`."""
import pytest
import torch

from models.registry import create_model
from tasks.augment import BatchAugment
from tasks.config import AugmentConfig, TrainConfig
from tasks.train import Split, Trainer, seed_everything
from tasks.kinds.supervised import SupervisedStep

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
CNNS = ["simple_cnn", "vgg", "resnet", "inception", "mobilenet", "transfer"]
SEQUENCE = ["rnn", "lstm", "gru", "attention", "transformer"]  # digits read row by row: 8 steps of 8 values


@pytest.fixture(scope="module")
def digits():
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x / 16.0 - 0.5, dtype=torch.float32).view(-1, 1, 8, 8).cuda()
    x = x.contiguous(memory_format=torch.channels_last)
    y = torch.tensor(y).cuda()
    return Split(x[:1400], y[:1400]), Split(x[1400:], y[1400:])


@pytest.mark.parametrize("arch", CNNS + SEQUENCE)
def test_trains_in_bf16_channels_last(arch, digits):
    seed_everything(0)
    options = {"trainable": True} if arch == "transfer" else {}
    model = create_model(arch, input_shape=(1, 8, 8), num_classes=10, **options)
    model = model.cuda().to(memory_format=torch.channels_last)
    train = {"epochs": 15, "lr": 3e-3} if arch in SEQUENCE else {"epochs": 8}  # recurrent nets learn slower here
    t = Trainer(model, TrainConfig(device="cuda", **train), 0, torch.device("cuda"), SupervisedStep(model, TrainConfig(device="cuda", **train), torch.device("cuda")))
    assert t.step.bf16  # precision auto on CUDA
    res = t.fit(*digits)
    assert res.history[-1]["val_accuracy"] > 0.85, res.history[-1]
    assert all(p.dtype == torch.float32 for p in model.parameters())  # autocast: weights stay fp32


def test_augmentation_runs_on_the_device_and_matches_the_cpu():
    cfg = AugmentConfig(enabled=True, rotation=20, width_shift=0.2, height_shift=0.2, zoom=0.2,
                        horizontal_flip=True, color_jitter=0.3)
    x = torch.rand(32, 3, 16, 16)
    make = lambda: BatchAugment(cfg, flip=True, mean=[0.5] * 3, std=[0.2] * 3, max_value=255, seed=3)  # noqa: E731
    cpu, gpu = make()(x), make()(x.cuda())
    assert gpu.device.type == "cuda"
    assert torch.allclose(cpu, gpu.cpu(), atol=1e-3)  # same draws, same warp


def test_resume_on_cuda_is_exact(digits):
    def fresh():
        seed_everything(0)
        model = create_model("resnet", input_shape=(1, 8, 8), num_classes=10).cuda()
        aug = BatchAugment(AugmentConfig(enabled=True), flip=False, mean=[0.0], std=[1.0], max_value=1.0, seed=0)
        return Trainer(model, TrainConfig(epochs=2, device="cuda", precision="fp32"), 0, torch.device("cuda"), SupervisedStep(model, TrainConfig(epochs=2, device="cuda", precision="fp32"), torch.device("cuda")),
                       augment=aug)

    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    straight = fresh()
    straight.fit(*digits)
    first = fresh()
    first.cfg.epochs = 1
    first.fit(*digits)
    resumed = fresh()
    resumed.load_state_dict(first.state_dict())
    resumed.fit(*digits)
    for a, b in zip(straight.model.parameters(), resumed.model.parameters()):
        assert torch.allclose(a, b, atol=1e-5)


@pytest.mark.parametrize("arch", ["lstm", "transformer"])
def test_token_models_train_on_the_device(arch):
    """Text: int64 token ids on the GPU (packed sequences / masks), bf16 autocast; the cue token decides the label."""
    from tasks.train import to_device

    seed_everything(0)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(2, 50, (1200, 20), generator=g)
    lengths = torch.randint(3, 21, (1200,), generator=g)
    ids[torch.arange(20)[None, :] >= lengths[:, None]] = 0  # right padding
    y = (ids == 7).any(1).long()
    train = to_device(ids[:1000].numpy(), y[:1000].numpy(), [0.0], [1.0], torch.device("cuda"), False)
    val = to_device(ids[1000:].numpy(), y[1000:].numpy(), [0.0], [1.0], torch.device("cuda"), False)
    assert train.x.dtype == torch.long and train.x.is_cuda
    model = create_model(arch, input_shape=(20,), num_classes=2, vocab_size=50).cuda()
    tr = Trainer(model, TrainConfig(epochs=8, lr=3e-3, device="cuda", precision="bf16"), 0, torch.device("cuda"), SupervisedStep(model, TrainConfig(epochs=8, lr=3e-3, device="cuda", precision="bf16"), torch.device("cuda")))
    tr.fit(train, val)
    assert tr.history[-1]["val_accuracy"] > 0.9, tr.history[-1]


def test_gan_trains_and_resumes_on_the_device(digits):
    from tasks.kinds.gan import GanStep

    seed_everything(0)
    train, _ = digits
    x = (train.x.contiguous() * 2).clamp(-1, 1)  # roughly [-1, 1], as the GAN stage scales images
    model = create_model("dcgan", input_shape=(1, 8, 8), num_classes=10, channels=16).cuda()
    cfg, cuda = TrainConfig(epochs=2, lr=2e-4, device="cuda", precision="bf16"), torch.device("cuda")
    tr = Trainer(model, cfg, 0, cuda, GanStep(model, cfg, 0, cuda))
    tr.fit(Split(x, train.y), None)
    assert all(torch.isfinite(torch.tensor([h["d_loss"], h["g_loss"]])).all() for h in tr.history)
    state = tr.state_dict()
    model2 = create_model("dcgan", input_shape=(1, 8, 8), num_classes=10, channels=16).cuda()
    again = Trainer(model2, cfg, 0, cuda, GanStep(model2, cfg, 0, cuda))
    again.load_state_dict(state)
    assert again.epoch == 2 and torch.equal(again.step.fixed_noise, tr.step.fixed_noise)
    assert tr.step.fixed_samples().shape == (64, 1, 8, 8)
