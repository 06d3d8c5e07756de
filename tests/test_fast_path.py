"""The GPU fast-path options, checked on the CPU: bf16 autocast stays close to float32, channels-last equals the
default layout, a compiled model trains like an eager one, and the main command says which are on."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

import train
from adalfl import AdaptiveLoss
from adalfl.config import SingleTaskConfig, TrainConfig
from adalfl.methods import METHOD_SPECS
from adalfl.trainer import SingleTaskTrainer
from engine.config import build_config
from engine.run_dir import RunDir
from tasks.models import build_model


def adalfl_steps(amp: torch.dtype | None = None, channels_last: bool = False, steps: int = 3):
    """`steps` AdaLFL steps of LeNet-5 (SGD, Nesterov momentum) on fixed random MNIST-sized batches; the model's
    and the loss network's parameters before and after."""
    torch.manual_seed(0)
    model = build_model("lenet5", (1, 28, 28), 10)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True)
    loss = AdaptiveLoss(num_outputs=10, amp=amp)
    before = [p.detach().clone() for p in (*model.parameters(), *loss.loss.parameters())]
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(32, 1, 28, 28, generator=g).contiguous(memory_format=memory_format)
        stats = loss.step(model, optimizer, (x, torch.randint(0, 10, (32,), generator=g)))
        assert bool(stats.finite)
    after = [p.detach().clone() for p in (*model.parameters(), *loss.loss.parameters())]
    return before, after, len(list(model.parameters()))


def relative_update_difference(run, reference, part: slice) -> float:
    """||update(run) - update(reference)|| / ||update(reference)|| over the parameters in `part`."""
    (b, a, _), (rb, ra, _) = run, reference
    diff = sum(float(((x - y) - (rx - ry)).pow(2).sum()) for x, y, rx, ry in zip(a[part], b[part], ra[part], rb[part]))
    norm = sum(float((rx - ry).pow(2).sum()) for rx, ry in zip(ra[part], rb[part]))
    return (diff / norm) ** 0.5


def bare_ce_steps(amp: torch.dtype | None = None, steps: int = 3):
    """The same steps with plain cross-entropy in a bare autocast loop: bf16's own error, the reference."""
    torch.manual_seed(0)
    model = build_model("lenet5", (1, 28, 28), 10)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True)
    before = [p.detach().clone() for p in model.parameters()]
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x, y = torch.randn(32, 1, 28, 28, generator=g), torch.randint(0, 10, (32,), generator=g)
        optimizer.zero_grad()
        with torch.autocast("cpu", dtype=amp or torch.bfloat16, enabled=amp is not None):
            outputs = model(x)
        F.cross_entropy(outputs.float(), y).backward()
        optimizer.step()
    return before, [p.detach().clone() for p in model.parameters()], len(before)


def test_bf16_autocast_is_as_close_to_float32_as_a_bare_bf16_step() -> None:
    fp32, bf16 = adalfl_steps(), adalfl_steps(amp=torch.bfloat16)
    model_part, loss_part = slice(0, fp32[2]), slice(fp32[2], None)
    reference = relative_update_difference(bare_ce_steps(torch.bfloat16), bare_ce_steps(), slice(None))
    assert 0 < relative_update_difference(bf16, fp32, model_part) <= 1.5 * reference
    assert relative_update_difference(bf16, fp32, loss_part) < 0.05  # the loss and its meta-gradient: float32


def test_channels_last_gives_the_default_layouts_step_and_meta_gradient() -> None:
    default, nhwc = adalfl_steps(), adalfl_steps(channels_last=True)
    for x, y in zip(default[1], nhwc[1], strict=True):
        torch.testing.assert_close(y, x, rtol=1e-4, atol=1e-6)


def run_california(tmp_path, shared_data, name: str, method: str, *extra: str) -> dict:
    code = train.main(["--config", "configs/adalfl_california.yaml", "--data-root", str(shared_data), "--runs-root",
                       str(tmp_path), "--set", f"name={name}", "--set", f"method={method}", "--set", "device=cpu",
                       "--set", "train.steps=20", "--set", "train.eval_every=10", "--set", "meta.init_steps=4",
                       "--set", "model.name=mlp", *extra])
    assert code == 0
    return json.loads((tmp_path / name / "results.json").read_text())


@pytest.mark.slow
def test_a_compiled_model_trains_like_the_eager_one(tmp_path, shared_data, capsys) -> None:
    eager = run_california(tmp_path, shared_data, "eager", "mse")
    compiled = run_california(tmp_path, shared_data, "compiled", "mse", "--set", "train.compile=true")
    assert "mse on cpu (compiled)" in capsys.readouterr().out
    assert compiled["test_mse"] == pytest.approx(eager["test_mse"], rel=1e-3)


def test_the_start_line_names_the_options_and_why_compile_is_ignored_for_adalfl(tmp_path, shared_data,
                                                                                 capsys) -> None:
    run_california(tmp_path, shared_data, "adalfl", "adalfl", "--set", "train.compile=true", "--set", "train.amp=bf16")
    out = capsys.readouterr().out
    assert "adalfl on cpu (bf16 autocast); train.compile is ignored for adalfl" in out


@pytest.mark.parametrize("method", ["mse", "adalfl"])
def test_the_trainer_takes_its_autocast_from_the_config_for_its_method(method: str, tmp_path, shared_data,
                                                                      monkeypatch) -> None:
    asked = []

    def autocast_dtype(self: TrainConfig, cuda: bool, learns_loss: bool) -> torch.dtype:
        asked.append((cuda, learns_loss))
        return torch.float16  # a value the trainer could not have chosen by itself

    monkeypatch.setattr(TrainConfig, "autocast_dtype", autocast_dtype)
    config = build_config(SingleTaskConfig, {"method": method, "device": "cpu", "model": {"name": "mlp"},
                                             "data": {"dataset": "california_housing"}})
    trainer = SingleTaskTrainer(config, RunDir(tmp_path / "run"), shared_data)
    assert asked == [(False, method == "adalfl")] and trainer.amp == torch.float16
    assert trainer.adaptive is None or trainer.adaptive.amp == torch.float16


@pytest.mark.parametrize("method", ["ce", "label_smoothing", "adalfl", "ml3"])
def test_auto_autocast_is_bf16_on_cuda_except_for_the_learned_loss_steps(method: str) -> None:
    learns = METHOD_SPECS[method].learns_loss
    auto, bf16, off = TrainConfig(amp="auto"), TrainConfig(amp="bf16"), TrainConfig(amp="off")
    assert auto.autocast_dtype(cuda=True, learns_loss=learns) == (None if method in ("adalfl", "ml3")
                                                                  else torch.bfloat16)
    assert auto.autocast_dtype(cuda=False, learns_loss=learns) is None
    assert bf16.autocast_dtype(cuda=False, learns_loss=learns) == torch.bfloat16  # asked for: on, also for AdaLFL
    assert off.autocast_dtype(cuda=True, learns_loss=learns) is None
