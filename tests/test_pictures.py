"""Per-latent pictures of image decoders: exact on linear decoders, autograd truth on convolutions, in TensorBoard."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch import LightningModule, Trainer, seed_everything
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_mem import ManifoldEntropicMetricsCallback
from lightning_mem.pictures import TRAVERSAL_STEPS, image_shape_of, latent_pictures

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*does not have many workers:UserWarning"),
    pytest.mark.filterwarnings("ignore:The number of training batches:UserWarning"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
]


def test_linear_image_decoder_pictures_are_its_columns_and_exact_traversals():
    torch.manual_seed(0)
    a = torch.randn(64, 3, dtype=torch.float64)
    decoder = lambda z: (z @ a.T).reshape(-1, 1, 8, 8)  # noqa: E731 - a decoder with a (1, 8, 8) image output
    z = torch.randn(5, 3, dtype=torch.float64)
    pictures = latent_pictures(decoder, z, [2, 0])
    assert pictures.latents.tolist() == [2, 0]
    torch.testing.assert_close(pictures.columns, a[:, [2, 0]].abs().T.reshape(2, 8, 8), rtol=0, atol=1e-12)
    for row, latent in enumerate((2, 0)):
        for column, t in enumerate(TRAVERSAL_STEPS):
            expected = ((z[0] + t * torch.eye(3, dtype=torch.float64)[latent]) @ a.T).reshape(8, 8)
            torch.testing.assert_close(pictures.traversals[row, column], expected, rtol=0, atol=1e-12)


def test_traversals_move_by_the_latent_scale_sigma():
    a = torch.eye(4, dtype=torch.float64)
    sigma = torch.tensor([1.0, 3.0, 1.0, 1.0], dtype=torch.float64)
    pictures = latent_pictures(lambda z: z @ a, torch.zeros(2, 4, dtype=torch.float64), [1], image_shape=(2, 2), sigma=sigma)
    assert pictures.traversals[0, :, 0, 1].tolist() == [3.0 * t for t in TRAVERSAL_STEPS]


def test_convolutional_rgb_decoder_columns_equal_the_autograd_mean_absolute_jacobian():
    torch.manual_seed(1)
    decoder = nn.Sequential(nn.Unflatten(1, (4, 1, 1)), nn.ConvTranspose2d(4, 3, 4), nn.Tanh()).double().eval()
    z = torch.randn(6, 4, dtype=torch.float64)
    pictures = latent_pictures(decoder, z, [3, 1])
    truth = torch.stack([torch.autograd.functional.jacobian(lambda v: decoder(v[None])[0], sample) for sample in z])  # (6, 3, 4, 4, 4)
    expected = truth.abs().mean(0)[..., [3, 1]].permute(3, 1, 2, 0)  # (k, H, W, C)
    torch.testing.assert_close(pictures.columns, expected, rtol=1e-10, atol=1e-12)
    assert tuple(pictures.traversals.shape) == (2, len(TRAVERSAL_STEPS), 4, 4, 3)


def test_image_shapes_are_recognised_or_declared_and_wrong_declarations_are_named():
    assert image_shape_of((28, 28)) == (28, 28) and image_shape_of((1, 28, 28)) == (28, 28)
    assert image_shape_of((64,)) is None and image_shape_of((5, 8, 8)) is None
    with pytest.raises(ValueError, match=r"`image_shape` .* 64 entries .* but got \(9, 9\)"):
        image_shape_of((64,), (9, 9))
    assert latent_pictures(nn.Linear(2, 6), torch.zeros(2, 2), [0]) is None  # a vector output is no image


class ImageAutoencoder(LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.latent_dim = 3
        self.encoder = nn.Sequential(nn.Flatten(), nn.Linear(64, 3))
        self.decoder = nn.Sequential(nn.Linear(3, 64), nn.Sigmoid(), nn.Unflatten(1, (1, 8, 8)))

    def training_step(self, batch, batch_idx):
        (x,) = batch
        return (self.decoder(self.encoder(x)) - x).square().mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_callback_logs_latent_pictures_of_an_image_decoder_to_tensorboard(tmp_path):
    seed_everything(0, verbose=False)
    data = DataLoader(TensorDataset(torch.rand(32, 1, 8, 8)), batch_size=8)
    logger = TensorBoardLogger(tmp_path, name="images")
    callback = ManifoldEntropicMetricsCallback(num_samples=16, num_evaluations=2, figures_every_n_evaluations=1, top_k=2)
    trainer = Trainer(
        max_steps=4, logger=logger, callbacks=[callback], accelerator="cpu", enable_checkpointing=False, enable_progress_bar=False
    )
    trainer.fit(ImageAutoencoder(), data)
    events = EventAccumulator(logger.log_dir, size_guidance={"images": 0}).Reload()
    steps = [entry["step"] for entry in callback.history]
    for tag in ("mem/latent_columns", "mem/latent_traversals"):
        images = events.Images(tag)
        assert [image.step for image in images] == steps
        assert all(image.width > 150 and image.height > 100 for image in images)
    columns, traversals = events.Images("mem/latent_columns")[-1], events.Images("mem/latent_traversals")[-1]
    assert traversals.height > columns.height  # two rows of strips (top_k = 2) against one row of columns
