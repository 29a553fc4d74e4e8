"""configurator.py: config files and --key=value overrides, and the one-line errors."""
import subprocess
import sys

import pytest

from configurator import ConfigError, apply_overrides

DEFAULTS = dict(lr=3e-4, batch_size=8, compile=True, out_dir="out", init_from=None, betas=(0.9, 0.95))


def run(*argv):
    g = dict(DEFAULTS)
    apply_overrides(g, DEFAULTS, argv)
    return g


def test_overrides_and_types(tmp_path):
    cfg = tmp_path / "cfg.py"
    cfg.write_text("import math\nbatch_size = 2 ** 4\nlr = 1\n_private = 'ignored'\n")
    g = run(str(cfg), "--compile=False", "--out_dir=runs/a=b", "--betas=(0.8, 0.9)", "--init_from", "ckpt.pt")
    assert g["batch_size"] == 16
    assert g["lr"] == 1.0 and isinstance(g["lr"], float)  # an int is fine for a float
    assert g["compile"] is False
    assert g["out_dir"] == "runs/a=b"  # values may contain '='
    assert g["betas"] == (0.8, 0.9)
    assert g["init_from"] == "ckpt.pt"  # --key value, and None takes any type
    assert run("--out_dir=2024")["out_dir"] == "2024"  # a str setting stays a str
    assert run("--compile")["compile"] is True  # bare flag


@pytest.mark.parametrize("argv, message", [
    (["--learning_rate=1e-3"], "unknown config key '--learning_rate'"),
    (["--batchsize=4"], "did you mean --batch_size?"),
    (["--batch_size=4.5"], "--batch_size expects int (default 8), got float 4.5"),
    (["--compile=yes"], "--compile expects True or False"),
    (["--lr=fast"], "--lr expects float"),
    (["--lr"], "--lr needs a value"),
    (["missing_config.py"], "cannot read config file missing_config.py"),
])
def test_errors(argv, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace("?", r"\?")):
        run(*argv)


def test_config_file_errors(tmp_path):
    bad_key = tmp_path / "bad_key.py"
    bad_key.write_text("batch_sise = 4\n")
    with pytest.raises(ConfigError, match=r"bad_key.py sets unknown key 'batch_sise' \(did you mean --batch_size\?\)"):
        run(str(bad_key))
    broken = tmp_path / "broken.py"
    broken.write_text("lr = (\n")
    with pytest.raises(ConfigError, match="broken.py failed: SyntaxError"):
        run(str(broken))


def test_configure_exits_with_one_line():
    code = ("import configurator; g = {'lr': 0.1}; configurator.configure(g, ['lr'], ['--lr=x'])")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr == "error: --lr expects float (default 0.1), got str 'x'\n"


def test_dict_calls_parse_as_config_files_write_them():
    g = {"sources": [], "tokenizer": "mistral"}
    apply_overrides(g, g, ["--sources=[dict(name='web', kind='local', path='raw/', weight=1)]"])
    assert g["sources"] == [{"name": "web", "kind": "local", "path": "raw/", "weight": 1}]
    # only plain dict(key=literal) calls are literals: anything else stays text, and is refused as the wrong type
    with pytest.raises(ConfigError, match="--sources expects list"):
        apply_overrides(g, g, ["--sources=[dict(name=open('x'))]"])
