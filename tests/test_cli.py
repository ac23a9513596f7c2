"""Tests of ``lightning-mem evaluate`` on what goes wrong in practice: old checkpoints, unwritable folders, broken user
modules, non-differentiable decoders, modules in the working directory, decoders one attribute deeper."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap

import pytest
import torch
from lightning.pytorch import Trainer
from torch.utils.data import DataLoader, TensorDataset

from lightning_mem.cli import main
from lightning_mem.evaluate import evaluate_checkpoint

pytestmark = pytest.mark.filterwarnings("ignore:.*treespec, LeafSpec.*")

USER_MODULE = textwrap.dedent(
    """
    import torch
    from lightning.pytorch import LightningModule
    from torch import nn


    class AE(LightningModule):
        calls = 0  # decoder calls, across instances

        def __init__(self, width=3, argmax=False):  # no latent size by name: `decode` needs --latent-dim
            super().__init__()
            self.save_hyperparameters()
            self.nets = nn.Module()
            self.nets.gen = nn.Sequential(nn.Linear(width, 8), nn.Tanh(), nn.Linear(8, 5))

        def decode(self, z):
            type(self).calls += 1
            x = self.nets.gen(z)
            return x.argmax(1, keepdim=True) if self.hparams.argmax else x

        def training_step(self, batch, batch_idx):
            return self.nets.gen(batch[0]).square().mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)
    """
)


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    """``ae_mod.py`` in ``tmp_path`` (on sys.path), and a checkpoint of its ``AE`` after one training step."""
    (tmp_path / "ae_mod.py").write_text(USER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("ae_mod", None)
    import ae_mod

    def checkpoint(name: str = "ae.ckpt", **options) -> str:
        trainer = Trainer(
            max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, accelerator="cpu"
        )
        trainer.fit(ae_mod.AE(**options), DataLoader(TensorDataset(torch.randn(4, 3)), batch_size=2))
        path = tmp_path / name
        trainer.save_checkpoint(path)
        return str(path)

    yield ae_mod, checkpoint
    sys.modules.pop("ae_mod", None)


def _evaluate(capsys, *args: str) -> tuple[int, str]:
    status = main(["evaluate", "--module-class", "ae_mod:AE", "--no-progress-bar", "--num-samples", "8", *args])
    return status, capsys.readouterr().err


def test_legacy_non_zip_checkpoint_gives_the_same_report(user_module, tmp_path, capsys):
    checkpoint = user_module[1]()
    legacy = tmp_path / "legacy.ckpt"
    torch.save(torch.load(checkpoint, weights_only=False), legacy, _use_new_zipfile_serialization=False)
    assert _evaluate(capsys, "--checkpoint", checkpoint, "--out", str(tmp_path / "zip"), "--latent-dim", "3")[0] == 0
    assert _evaluate(capsys, "--checkpoint", str(legacy), "--out", str(tmp_path / "legacy"), "--latent-dim", "3")[0] == 0
    zip_report = json.loads((tmp_path / "zip" / "report.json").read_text())
    legacy_report = json.loads((tmp_path / "legacy" / "report.json").read_text())
    assert legacy_report["entropy"] == zip_report["entropy"] and legacy_report["global_step"] == zip_report["global_step"] == 1


def test_unwritable_output_and_unloadable_checkpoint_fail_before_any_computation(user_module, tmp_path, capsys):
    ae_mod, checkpoint = user_module[0], user_module[1]()
    not_a_folder = tmp_path / "a_file"
    not_a_folder.write_text("")
    ae_mod.AE.calls = 0
    status, err = _evaluate(capsys, "--checkpoint", checkpoint, "--out", str(not_a_folder / "out"))
    assert status == 2 and ae_mod.AE.calls == 0  # the decoder was never called
    assert err.count("\n") == 1 and "`out_dir` to be a writable folder" in err
    corrupt = tmp_path / "corrupt.ckpt"
    corrupt.write_bytes(b"not a checkpoint")
    status, err = _evaluate(capsys, "--checkpoint", str(corrupt), "--out", str(tmp_path / "never"))
    assert status == 2 and ae_mod.AE.calls == 0 and not (tmp_path / "never").exists()
    assert err.count("\n") == 1 and "Could not load checkpoint" in err


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("import torch\n\nclass AE(:\n    pass\n", r"SyntaxError: .*broken_mod\.py, line 3\)"),
        (
            "import torch\nimport no_such_package_xyz\n",
            r"ModuleNotFoundError: No module named 'no_such_package_xyz' \(.*broken_mod\.py, line 2\)",
        ),
        ("import torch\nfrom torch import no_such_name\n", r"ImportError: cannot import name 'no_such_name'.*\(.*broken_mod\.py, line 2\)"),
        ("x = 1\ny = 1 / 0\n", r"ZeroDivisionError: division by zero \(.*broken_mod\.py, line 2\)"),
    ],
    ids=["syntax", "missing-package", "missing-name", "error-at-import"],
)
def test_a_broken_user_module_is_one_line_naming_the_file_and_line(tmp_path, monkeypatch, capsys, source, expected):
    (tmp_path / "broken_mod.py").write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("broken_mod", None)
    checkpoint = tmp_path / "any.ckpt"
    checkpoint.write_bytes(b"")
    status = main(["evaluate", "--module-class", "broken_mod:AE", "--checkpoint", str(checkpoint)])
    err = capsys.readouterr().err
    assert status == 2 and err.count("\n") == 1, err
    assert err.startswith("lightning-mem evaluate: error: Could not import `module_class` 'broken_mod:AE': ")
    assert re.search(expected, err), err


def test_a_non_differentiable_decoder_gets_a_named_error(user_module, tmp_path, capsys):
    argmax = user_module[1]("argmax.ckpt", argmax=True)
    status, err = _evaluate(capsys, "--checkpoint", argmax, "--out", str(tmp_path / "out"), "--latent-dim", "3")
    assert status == 2 and err.count("\n") == 1
    assert "The decoder `decode` failed a test call: Expected the decoder output to be a floating point tensor" in err
    assert "element 0 of tensors" not in err  # not autograd's own message
    assert not (tmp_path / "out" / "spectrum.png").exists()


def test_a_dotted_decoder_path_and_the_latent_size_from_its_first_layer(user_module, tmp_path, capsys):
    ae_mod, checkpoint = user_module[0], user_module[1]()
    out = tmp_path / "out"
    assert _evaluate(capsys, "--checkpoint", checkpoint, "--out", str(out), "--decoder", "nets.gen")[0] == 0
    report = json.loads((out / "report.json").read_text())
    assert report["decoder"] == "nets.gen" and report["latent_dim"] == 3  # read off nets.gen's first nn.Linear
    options = {"num_samples": 8, "out_dir": tmp_path / "direct", "progress": False}
    direct = evaluate_checkpoint(checkpoint, ae_mod.AE, decoder="decode", latent_dim=3, **options)
    assert direct["entropy"] == pytest.approx(report["entropy"], abs=1e-6)  # decode is nets.gen


@pytest.mark.slow
def test_module_class_is_imported_from_the_working_directory(user_module, tmp_path):
    """As the ``lightning-mem`` console script runs: the working directory is not on ``sys.path`` by itself."""
    checkpoint = user_module[1]()
    isolated = [sys.executable, "-I", "-c"]  # -I: neither the working directory nor PYTHONPATH on sys.path
    missing = subprocess.run([*isolated, "import ae_mod"], cwd=tmp_path, capture_output=True, text=True)
    assert missing.returncode != 0 and "No module named 'ae_mod'" in missing.stderr
    cli = "import sys; from lightning_mem.cli import main; sys.exit(main(sys.argv[1:]))"
    argv = ["evaluate", "--module-class", "ae_mod:AE", "--checkpoint", checkpoint, "--num-samples", "8", "--latent-dim", "3"]
    result = subprocess.run([*isolated, cli, *argv], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "ae_mem" / "report.json").is_file()


def test_version_is_the_installed_distributions(capsys):
    from importlib.metadata import version

    with pytest.raises(SystemExit) as exit_status:
        main(["--version"])
    assert exit_status.value.code == 0
    assert capsys.readouterr().out == f"lightning-mem {version('lightning_mem')}\n"
