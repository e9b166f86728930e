"""Every option of every config group composes, and what it describes can be built."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from piggyback.backbones import build_backbone
from piggyback.methods import Method, build_method, method_class
from piggyback.nn import mask_model, module_masks
from piggyback.train import CONF_DIR, task_configs
from piggyback.utils.instantiate import build, build_all, to_dict

CONF = Path(CONF_DIR)


def _options(group: str) -> list[str]:
    root = CONF / group
    paths = (p.relative_to(root) for p in root.rglob("*.yaml"))
    # _base/ holds files other options build on, not choices of their own
    return sorted(str(p.with_suffix("")) for p in paths if not p.parts[0].startswith("_"))


def test_every_group_has_options():
    for group in (
        "backbone",
        "data",
        "mask",
        "method",
        "trainer",
        "logger",
        "callbacks",
        "paths",
        "hydra",
        "experiment",
        "debug",
    ):
        assert _options(group), group


@pytest.mark.parametrize("option", _options("backbone"))
def test_backbone_configs_build(make_cfg, option):
    cfg = make_cfg(f"backbone={option}")
    spec = to_dict(cfg.backbone)
    assert spec["name"] == Path(option).name or option == "timm"  # timm: any timm name
    backbone = build_backbone(**{**spec, "weights": None, "checkpoint": None})
    assert backbone.feature_dim > 0
    assert not isinstance(list(backbone.model.modules())[-1], torch.nn.Linear) or option == "vgg16"


@pytest.mark.parametrize("option", _options("data"))
def test_data_configs_build(make_cfg, option):
    cfg = make_cfg(f"data={option}")
    if option == "imagefolder":  # root, num_classes and task_name are the user's to give
        assert OmegaConf.missing_keys(cfg.data) == {
            "data.root",
            "data.num_classes",
            "data.task_name",
        }
        cfg = make_cfg(f"data={option}", "data.root=x", "data.num_classes=3", "data.task_name=t")
    for data_cfg in task_configs(cfg.data):
        datamodule = build(data_cfg)
        assert datamodule.num_classes == data_cfg.num_classes
        assert datamodule.task_name == data_cfg.task_name


@pytest.mark.parametrize("option", _options("mask"))
def test_mask_configs_build_a_masked_layer(make_cfg, option):
    cfg = make_cfg(f"mask={option}")
    spec = to_dict(cfg.mask)
    conv = mask_model(torch.nn.Conv2d(2, 3, 3), **spec)
    mask = module_masks(conv)["weight"]
    units = {"element": (3, 2, 3, 3), "kernel": (3, 2, 1, 1), "filter": (3, 1, 1, 1)}
    assert tuple(mask.mask_real.shape) == units[spec["granularity"]]
    assert (mask.soft_scale is not None) == spec["soft"] == (option == "soft")


@pytest.mark.parametrize("option", _options("method"))
def test_method_configs_build_optimizers(make_cfg, option):
    cfg = make_cfg(f"method={option}", "~experiment")  # the method files alone: paper recipe
    method = build_method(to_dict(cfg.method))
    assert isinstance(method, Method) and method.name == cfg.method.name
    assert method_class(cfg.method.name) is type(method)
    param = torch.nn.Parameter(torch.zeros(2))
    optimizer = build(cfg.method.optimizer)([{"params": [param], "lr": 1e-3}])
    scheduler = build(cfg.method.scheduler)(optimizer, total_epochs=30)
    milestones = {"packnet": [10], "cpg": []}.get(cfg.method.name, [15])  # the papers' epochs
    assert scheduler.milestones == milestones


@pytest.mark.parametrize("option", _options("trainer"))
def test_trainer_configs_build(make_cfg, option):
    cfg = make_cfg(f"trainer={option}")
    # GPU configs are built with the CPU accelerator: the config itself must be valid.
    overrides = (
        {}
        if cfg.trainer.accelerator == "cpu"
        else {"accelerator": "cpu", "devices": 1, "precision": "32-true", "strategy": "auto"}
    )
    trainer = build(cfg.trainer, logger=False, enable_checkpointing=False, **overrides)
    assert trainer.max_epochs == cfg.trainer.max_epochs


@pytest.mark.parametrize("option", _options("logger"))
def test_logger_configs_build(make_cfg, option):
    cfg = make_cfg(f"logger={option}")
    loggers = build_all(cfg.logger, **({}))
    assert len(loggers) == (0 if option == "none" else 1)


def test_several_loggers_compose(make_cfg):
    cfg = make_cfg("logger=[csv,tensorboard,wandb]")
    assert set(cfg.logger) == {"csv", "tensorboard", "wandb"}
    assert cfg.logger.wandb.offline is True


@pytest.mark.parametrize("option", _options("callbacks"))
def test_callback_configs_build(make_cfg, option):
    cfg = make_cfg(f"callbacks={option}")
    callbacks = build_all(cfg.callbacks)
    if option == "none":
        assert callbacks == []
        return
    names = [type(c).__name__ for c in callbacks]
    assert names == [
        "ModelCheckpoint",
        "ModelCheckpoint",
        "LearningRateMonitor",
        "TQDMProgressBar",
        "CollapseMonitor",
    ]
    best, last = callbacks[:2]
    assert (best.monitor, best.save_last) == ("val/acc", None)
    assert (last.monitor, last.filename, last.save_top_k) == (None, "last", 1)  # every epoch


@pytest.mark.parametrize("option", _options("experiment"))
def test_experiments_compose_and_build_their_data(make_cfg, option):
    cfg = make_cfg(f"experiment={option}")
    assert cfg.run_name == "test"  # overridden by the fixture
    for data_cfg in task_configs(cfg.data):
        assert build(data_cfg).num_classes == data_cfg.num_classes


def test_finegrained_experiment_uses_the_paper_recipe(make_cfg):
    cfg = make_cfg("experiment=finegrained_resnet50", "data=finegrained/cars")
    assert cfg.backbone.name == "resnet50"
    assert cfg.data.num_classes == 196
    assert cfg.method.lr.masks == 1e-4 and cfg.method.scheduler.milestones == [0.5]
    assert cfg.trainer.max_epochs == 30


@pytest.mark.parametrize("option", _options("debug"))
def test_debug_configs_compose(make_cfg, option):
    cfg = make_cfg(f"debug={option}")
    assert cfg.trainer.max_epochs >= 1


@pytest.mark.parametrize(
    ("launcher", "target"),
    [
        ("parallel", "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher"),
        ("slurm", "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"),
    ],
)
def test_launcher_configs_compose(launcher, target):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("train", overrides=[f"hydra/launcher={launcher}"], return_hydra_config=True)
    assert cfg.hydra.launcher._target_ == target
    OmegaConf.to_container(cfg.hydra.launcher, resolve=False)


def test_default_config_is_the_offline_demo(make_cfg):
    cfg = make_cfg()
    assert cfg.backbone.name == "small_cnn"
    tasks = task_configs(cfg.data)
    assert [t.task_name for t in tasks] == ["digits_rotated", "digits_inverted", "digits_mod3"]


def test_domains_experiment_sweeps_every_method_over_the_seven_tasks():
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(
            "train",
            overrides=["experiment=domains", "trainer.max_epochs=12"],
            return_hydra_config=True,
        )
    assert cfg.backbone.name == "efficientnet_lite0" and cfg.task_inference is None
    tasks = {t.task_name: t.num_classes for t in task_configs(cfg.data)}
    assert tasks == {
        "sign_digits": 10,
        "gtsrb": 43,
        "pacs_sketch": 7,
        "flowers17": 17,
        "magnetic_tiles": 6,
        "retina": 5,
        "cifar10_small": 10,
    }
    assert list(tasks) == list(cfg.data.tasks)  # learned in this order, cifar10_small last
    roots = {t.task_name: (t.root, t.name) for t in task_configs(cfg.data)}
    data_dir = cfg.paths.data_dir
    assert roots["gtsrb"] == (f"{data_dir}/domains", "gtsrb")
    assert roots["cifar10_small"] == (f"{data_dir}/cifar10_small", "")
    assert cfg.method.scheduler.milestones == [0.5]  # the method's own shape
    params = cfg.hydra.sweeper.params
    # piggyback_lean is Piggyback with another optimizer (same method, leaner state), checked
    # against Adam on its own (benchmarks/README.md), not a rival in the comparison
    compared = [m for m in _options("method") if m != "piggyback_lean"]
    assert sorted(params.method.split(",")) == compared
    assert len(str(params["method.lr_scale"]).split(",")) > 1
