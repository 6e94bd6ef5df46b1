import random

import numpy as np
import pytest
import torch

import utils


def test_seed_everything_repeats_all_generators():
    def draw():
        return random.random(), np.random.rand(), torch.rand(1).item()

    utils.seed_everything(123)
    first = draw()
    utils.seed_everything(123)
    assert draw() == first
    utils.seed_everything(124)
    assert draw() != first


def test_select_device_auto_and_cpu():
    assert utils.select_device("cpu") == torch.device("cpu")
    assert utils.select_device("auto").type in {"cpu", "cuda", "mps"}


def test_select_device_unavailable_cuda_names_what_exists():
    if torch.cuda.is_available():
        pytest.skip("CUDA is present here")
    with pytest.raises(ValueError, match="CUDA is not available.*available: cpu"):
        utils.select_device("cuda")


def test_select_device_rejects_nonsense():
    with pytest.raises(ValueError, match="not a device name"):
        utils.select_device("gpu0")


def test_print0_prints_on_rank0_only(capsys, monkeypatch):
    utils.print0("hello")
    assert capsys.readouterr().out == "hello\n"
    monkeypatch.setenv("RANK", "1")
    utils.print0("hidden")
    assert capsys.readouterr().out == ""


@pytest.mark.gpu
def test_cuda_device_selected_when_present():
    assert utils.select_device("auto").type == "cuda"
