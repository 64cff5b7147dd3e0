"""Every config builds with each documented variant; typos fail loudly."""

import glob
import os
import subprocess
import sys

import ml_collections
import pytest

from dalle_jax import configlib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Each config file with the argument strings its docstring documents.
VARIANTS = {
    "shapes.py": ["", "size=tiny", "size=small", "size=paper", "size=tiny,batch=8,augment=transformer"],
    "captions.py": ["name=mydata", "name=mydata,image_size=128,augment=none"],
    "dvae_shapes.py": ["", "size=tiny", "size=small", "size=tiny,steps=10,batch=8"],
    "dvae_paper.py": ["", "runlocal", "name=cc3m,batch=64"],
    "transformer_shapes.py": ["", "size=tiny", "size=tiny,steps=10,batch=8,tokens=/tmp/tokens"],
    "transformer_paper.py": ["tokens=/tmp/tokens", "runlocal,tokens=/tmp/tokens",
                       "tokens=/tmp/tokens,fsdp=16,tensor=4,batch=512"],
    "clip_shapes.py": ["", "size=tiny", "size=tiny,steps=10,batch=16,bpe=/tmp/bpe.model"],
    "clip_openai.py": ["", "checkpoint=/tmp/ViT-B-32.pt,vocab=/tmp/bpe_simple_vocab_16e6.txt.gz"],
    "eval_coco.py": ["", "coco=/data/coco,transformer=t,dvae=d,bpe=b,scorer=s,n=512"],
}


def _path(name):
    return os.path.join(ROOT, "configs", name)


def test_every_config_file_is_covered():
    files = {os.path.basename(p) for p in glob.glob(_path("*.py"))} - {"common.py"}
    assert files == set(VARIANTS), "add new config files to VARIANTS with their documented args"


@pytest.mark.parametrize("name,arg", [(n, a) for n, args in VARIANTS.items() for a in args])
def test_config_builds_and_is_locked(name, arg):
    cfg = configlib.load_config(f"{_path(name)}:{arg}")
    assert isinstance(cfg, ml_collections.ConfigDict)
    assert set(cfg.mesh.keys()) == {"data", "fsdp", "tensor"}
    with pytest.raises(AttributeError):
        cfg.mesh.dta = 3  # a typo must not create a new field
    # Resolved configs serialise for workdir/config.json.
    assert '"mesh"' in configlib.to_json(cfg)
    if "data" in cfg:  # the configs that train or read a dataset
        assert cfg.data.global_batch_size > 0
        with pytest.raises(AttributeError):
            cfg.data.batch_sise = 3


@pytest.mark.parametrize("name", ["dvae_shapes.py", "dvae_paper.py"])
def test_dvae_configs_build_their_model(name):
    """The model section is a valid DVAEConfig and matches the data resolution."""
    from dalle_jax.train import dvae_task

    cfg = configlib.load_config(_path(name))
    mcfg = dvae_task.model_config(cfg)
    assert mcfg.image_size == cfg.data.image_size
    assert cfg.total_steps > 0 and cfg.optim.name == "adamw"
    assert dvae_task.loss_options(cfg)["recon_loss"] in ("logit_laplace", "mse")


def test_dvae_paper_config_keeps_the_paper_loss():
    from dalle_jax.train import dvae_task

    opts = dvae_task.loss_options(configlib.load_config(_path("dvae_paper.py")))
    assert opts["recon_loss"] == "logit_laplace" and opts["ln_b_min"] == float("-inf")


def test_unknown_arg_key_fails():
    with pytest.raises(ValueError, match="unknown config arg 'siz'"):
        configlib.load_config(_path("shapes.py") + ":siz=tiny")


@pytest.mark.parametrize("arg,err", [
    ("size=huge", "shapes size 'huge'"),
    ("batch=many", "expected an integer"),
    ("augment=rotate", "augment='rotate'"),
    ("size", "needs a value"),
])
def test_bad_arg_values_fail(arg, err):
    with pytest.raises(ValueError, match=err):
        configlib.load_config(_path("shapes.py") + ":" + arg)


def test_captions_config_needs_a_name():
    with pytest.raises(ValueError, match="needs a dataset name"):
        configlib.load_config(_path("captions.py"))


def test_parse_arg_types_and_flags():
    a = configlib.parse_arg("n=3,lr=0.5,runlocal,name=x", n=1, lr=1.0, runlocal=False, name="")
    assert (a.n, a.lr, a.runlocal, a.name) == (3, 0.5, True, "x")
    assert configlib.parse_arg("runlocal=false", runlocal=True).runlocal is False
    with pytest.raises(ValueError, match="expected a boolean"):
        configlib.parse_arg("runlocal=maybe", runlocal=True)


def test_cli_override_typo_fails(tmp_path):
    """`--config.data.batchsize=...` (a typo) must stop the job before it does anything."""
    cmd = [sys.executable, "-m", "dalle_jax.main", "--job=prepare",
           f"--config={_path('shapes.py')}:size=tiny", f"--workdir={tmp_path}/w",
           "--config.data.global_batchsize=4"]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert out.returncode != 0
    assert "global_batchsize" in out.stderr
    assert not os.path.exists(tmp_path / "w" / "config.json")
