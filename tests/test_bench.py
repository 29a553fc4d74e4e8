"""bench.py's kvcache rows: the rolling buffer holds exactly W/L of a full cache (computed for
moxin-7b at 32k tokens, allocated for a small model) and gives the same hidden state; its
settings go through the configurator; and it imports no eval.py."""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import bench  # noqa: E402
from model import model_args  # noqa: E402


def test_kvcache_is_window_over_length():
    computed, allocated = bench.kvcache_rows(torch.device("cpu"), small="tiny", L_small=64)
    # moxin-7b: 36 layers x (k, v) x 8 kv heads x 128 head_dim x 2 bytes, per cached position
    per_token = 36 * 2 * 8 * 128 * 2
    assert computed["ours"] == 4096 * per_token and computed["ref"] == 32768 * per_token
    assert computed["ratio"] == 4096 / 32768
    assert allocated["ratio"] == model_args("tiny").sliding_window / 64
    assert "same last hidden state" in allocated["note"]


def test_bad_settings_are_one_line(capsys):
    for argv, message in ((["--only", "train,speed"], "unknown speed (sections: train, decode, rollout, kvcache, "
                                                      "eval, data;"),
                          (["--eval_tasks=piqa,mmlu_pro"], "unknown eval_tasks mmlu_pro (sections: "),
                          (["--device=tpu"], "--device must be cpu or cuda, got tpu"),
                          (["--rounds=3"], "unknown config key '--rounds'")):
        with pytest.raises(SystemExit) as exit_info:
            bench.main(argv)
        assert exit_info.value.code == 2
        assert capsys.readouterr().err.startswith(f"error: {message}")


def test_bench_measures_eval_through_its_command_line():
    """bench.py runs eval.py as a user does, a command writing --out JSON: importing bench loads no eval.py
    (it imports grpo.py, whose rollouts it measures)."""
    import subprocess

    code = "import sys, bench; print(sorted({'eval', 'pretrain', 'sft', 'dpo'} & set(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parent.parent)
    assert done.stdout.strip() == "[]", done.stderr
