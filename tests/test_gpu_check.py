"""tests/gpu_check.py, the one command that checks and measures the CUDA path on a GPU: on this CPU it
runs end to end as docs/gpu-check.md writes it, in under a minute of CPU time, with what needs CUDA
reported as skipped and every key in its JSON; its arithmetic (MFU, the memory ratio, which SDPA
kernel a profile names) against hand computations; a part that overruns its limit is stopped with
what it started, and keeps what it reported."""
import json
import re
import resource
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / 'tests'))
import gpu_check  # noqa: E402
from model import model_args  # noqa: E402

# every check of every part, as docs/gpu-check.md lists them
KEYS = {'correctness': {'attention_fp32', 'attention_bf16', 'cached_decode', 'generate_gpu_vs_cpu', 'fsdp2_step'},
        'kernels': {'causal_gqa_2k', 'windowed'},
        'train': {'eager', 'eager_ac', 'compile', 'compile_ac'},
        'memory': {'eager', 'eager_ac', 'compile', 'compile_ac'},
        'decode': {'batch_1', 'batch_64', 'grpo_slice', 'grpo_demo'},
        'eval': {'piqa'}}
# what a CPU run cannot do: bf16 kernels, a GPU to compare with, compile (minutes on 2 cores), and
# CUDA's allocator to measure memory with
SKIPPED_ON_CPU = {('correctness', 'attention_bf16'), ('correctness', 'generate_gpu_vs_cpu'),
                  ('train', 'compile'), ('train', 'compile_ac')} | {('memory', k) for k in KEYS['memory']}


def doc_command():
    """The first command of docs/gpu-check.md's first bash block: the one command."""
    text = (ROOT / 'docs' / 'gpu-check.md').read_text()
    block = re.search(r'```bash\n(.*?)```', text, re.S).group(1)
    return shlex.split(block.strip().splitlines()[0], comments=True)


def test_cpu_run_end_to_end(tmp_path):
    argv = doc_command()
    assert argv[:2] == ['python', 'tests/gpu_check.py']
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    # from a directory of its own, so that the JSON lands there; the script as the docs name it
    run = subprocess.run([sys.executable, str(ROOT / argv[1]), *argv[2:]], cwd=tmp_path, capture_output=True,
                         text=True, timeout=180)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    # Under a minute of CPU time, its parts and eval.py included (about 25 s here): its wall time on a
    # quiet machine, which a machine shared by other jobs stretches (2-3x at a load average of 6)
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    assert cpu < 60, f"the CPU run took {cpu:.0f}s of CPU time"
    report = json.loads((tmp_path / 'gpu_check.json').read_text())
    parts = report['parts']
    assert {name: set(part['results']) for name, part in parts.items()} == KEYS
    status = {(name, key): r['status'] for name, part in parts.items() for key, r in part['results'].items()}
    assert {k for k, s in status.items() if s == 'skipped'} == SKIPPED_ON_CPU
    assert all(s == 'ok' for k, s in status.items() if k not in SKIPPED_ON_CPU), status
    assert report['device'] == 'cpu' and all(p['status'] == 'ok' for p in parts.values())

    # what the toy run checks for real: each against an independent computation
    results = {name: part['results'] for name, part in parts.items()}
    assert max(results['correctness']['attention_fp32']['rel_err'].values()) < 1e-5
    fsdp = results['correctness']['fsdp2_step']
    assert fsdp['backend'] == 'gloo' and fsdp['loss'] == pytest.approx(fsdp['plain_loss'], rel=1e-5)
    assert {r['backend'] for r in results['kernels'].values()} <= {'flash', 'efficient', 'math', 'cudnn'}
    assert results['train']['eager']['tokens_per_s'] > 0 and results['train']['eager']['mfu'] is None
    predicted = {k: r['predicted_bytes'] for k, r in results['memory'].items()}
    # the dry run's prediction does not depend on compile, and checkpointing saves memory
    assert predicted['eager'] == predicted['compile'] > predicted['eager_ac'] == predicted['compile_ac'] > 0
    for key in ('batch_1', 'batch_64'):  # float32 on CPU: model.generate == HF generate, greedy
        assert results['decode'][key]['same_rows'] == results['decode'][key]['rows']
    piqa = results['eval']['piqa']
    assert piqa['same_answers'] == piqa['questions'] and piqa['max_ll_diff'] < 1e-3


def test_mfu_by_hand():
    """moxin-7b's shape with 12 blocks, by hand: per block wq, wo 4096 x 4096 and wk, wv 4096 x 1024
    (41,943,040) + w1, w2, w3 3 x 4096 x 14336 (176,160,768) = 218,103,808 weights; 12 blocks and the
    32000 x 4096 head: 2,748,317,696 matmul weights, 6 FLOPs each per token; attention 12 x layers x
    heads x head_dim x context = 12 x 12 x 32 x 128 x 2048."""
    args = model_args('moxin-7b', n_layers=12)
    per_token = 6 * 2_748_317_696 + 12 * 12 * 32 * 128 * 2048
    assert per_token == 17_697_865_728
    # 4 x 2048 tokens in 0.4 s on an H100's 989 TFLOP/s
    assert gpu_check.mfu(args, 2048, 8192, 0.4, 989e12) == pytest.approx(per_token * 8192 / 0.4 / 989e12)
    assert gpu_check.mfu(args, 2048, 8192, 0.4, 989e12) == pytest.approx(0.36648, abs=1e-5)
    # past the 4096-token window a token attends to 4096 keys, not to the whole sequence
    long = 6 * 2_748_317_696 + 12 * 12 * 32 * 128 * 4096
    assert gpu_check.mfu(args, 8192, 8192, 0.4, 989e12) == pytest.approx(long * 8192 / 0.4 / 989e12)
    assert gpu_check.mfu(args, 2048, 8192, 0.4, None) is None  # no datasheet peak: no MFU


def test_memory_ratio_by_hand():
    assert gpu_check.memory_ratio(48 * 2 ** 30, 45 * 2 ** 30) == pytest.approx(16 / 15)
    assert gpu_check.memory_ratio(None, 45 * 2 ** 30) is None
    # a setting's result as a GPU run makes it, and as one whose train setting never finished
    row = gpu_check.memory_result(48 * 2 ** 30, 45 * 2 ** 30, True, 'unused')
    assert row['status'] == 'ok' and row['ratio'] == pytest.approx(16 / 15)
    assert row['summary'] == 'measured 48.00 GiB / predicted 45.00 GiB = 1.067 (the dry run measures eagerly)'
    row = gpu_check.memory_result(None, 45 * 2 ** 30, False, 'train eager: timeout')
    assert row['status'] == 'skipped' and row['reason'] == 'train eager: timeout' and row['ratio'] is None


@pytest.mark.parametrize('names, backend', [
    (['aten::scaled_dot_product_attention', 'aten::_scaled_dot_product_flash_attention',
      'void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<128, 128, 64, 4>, true>(Flash_fwd_params)'],
     'flash'),
    # cuDNN's kernel names say flash too
    (['aten::_scaled_dot_product_cudnn_attention',
      'cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3_64x64x128_4x1x1_kernel0_0'], 'cudnn'),
    (['aten::_scaled_dot_product_efficient_attention',
      'fmha_cutlassF_bf16_aligned_64x128_rf_sm80(PyTorchMemEffAttention::AttentionKernel::Params)'], 'efficient'),
    (['aten::_scaled_dot_product_attention_math', 'aten::bmm', 'aten::_softmax'], 'math'),
    (['aten::mm', 'aten::softmax'], 'unknown'),
])
def test_sdpa_backend_from_names(names, backend):
    assert gpu_check.sdpa_backend(names) == backend


def test_generate_check_on_cpu(one_thread):
    """The GPU-vs-CPU generate check, with the CPU standing in for the GPU: float32 gives the same
    tokens, bf16 (which CPUs compute too, slowly) may part ways only at a near tie."""
    import torch

    result = gpu_check.check_generate(torch.device('cpu'))
    assert result['status'] == 'ok' and result['float32']['same_rows'] == 3
    assert all(d is None or abs(d[1]) < 5e-2 for d in result['bfloat16']['divergences'])


def _gone(pid):
    """Whether process pid has ended (a zombie has: it waits only for its parent to read its status)."""
    try:
        with open(f'/proc/{pid}/stat') as f:
            return f.read().rsplit(')', 1)[1].split()[0] == 'Z'
    except FileNotFoundError:
        return True


def test_a_part_past_its_limit_is_stopped_with_what_it_started():
    def hangs(report):
        sleeper = subprocess.Popen(['sleep', '60'])
        report('started', dict(status='ok', pid=sleeper.pid))
        time.sleep(60)

    t0 = time.time()
    part = gpu_check.run_part(hangs, limit=1.0)
    assert part['status'] == 'timeout' and time.time() - t0 < 10
    assert part['results']['started']['status'] == 'ok'  # what it reported before the limit is kept
    pid = part['results']['started']['pid']
    deadline = time.time() + 5
    while not _gone(pid) and time.time() < deadline:
        time.sleep(0.05)
    assert _gone(pid)
    # the keys it never reached take the part's fate
    assert gpu_check.complete(part, ['started', 'never'])['results']['never']['status'] == 'timeout'


def test_a_part_that_raises_reports_one_line():
    def raises(report):
        report('first', dict(status='ok'))
        raise ValueError('bad input\nsecond line')

    part = gpu_check.run_part(raises, limit=30)
    assert part['status'] == 'failed' and part['error'] == 'ValueError: bad input'
    assert part['results'] == {'first': {'status': 'ok'}}


def test_unknown_part_is_one_line(monkeypatch, capsys):
    monkeypatch.setattr(gpu_check, 'parts', 'correctness,trian')
    with pytest.raises(SystemExit) as stopped:
        gpu_check.main()
    assert stopped.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: unknown part 'trian' in --parts or --limits (parts: correctness, kernels, train, memory, decode, eval)"]
