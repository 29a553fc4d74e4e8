"""Run by tests/test_dryrun.py under torchrun (gloo): build the tiny model and its optimizer as a
training stage does, take one step, and write rank 0's parameter layout and bytes to argv[1] (JSON);
then the same with compile and activation checkpointing on: its loss and what Dynamo captured; then
grpo.py's reference with bf16 matmul weights beside a policy, both computing in bf16 as on CUDA: their
log-probs and bytes."""
import json
import sys
from pathlib import Path

import torch
from torch._dynamo.utils import counters
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import MixedPrecisionPolicy

FULL = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from model import model_args  # noqa: E402
from grpo import build_reference  # noqa: E402
from trainer import build_model, build_optimizer, lm_loss, setup_distributed, train_step  # noqa: E402


def layout(model):
    """{parameter name: [placements, local shape, dtype]}: how a rank holds each parameter."""
    return {name: [str(p.placements), list(p.to_local().shape), str(p.dtype)] for name, p in model.named_parameters()}


def local_bytes(tensors):
    return sum(t.to_local().nbytes if hasattr(t, 'to_local') else t.nbytes for t in tensors)


if __name__ == '__main__':
    rank, world_size, device = setup_distributed()
    x = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(rank))
    model = build_model(model_args('tiny'), device, seed=0)
    optimizer = build_optimizer(model, 1e-3, 0.1, (0.9, 0.95), 1e-8, device)
    loss = train_step(model, optimizer, [(x, x)], lm_loss, 1e-3, 1.0)['loss']
    state = [t for s in optimizer.state.values() for t in s.values()]
    probe = {'layout': layout(model), 'params': local_bytes(model.parameters()), 'optimizer': local_bytes(state),
             'loss': loss}
    compile_module = torch.nn.Module.compile  # as build_model calls it, with a backend that compiles in seconds
    torch.nn.Module.compile = lambda self, **kw: compile_module(self, backend='aot_eager', **kw)
    model = build_model(model_args('tiny'), device, seed=0, compile=True, activation_checkpointing=True)
    optimizer = build_optimizer(model, 1e-3, 0.1, (0.9, 0.95), 1e-8, device)
    probe.update(compiled_loss=train_step(model, optimizer, [(x, x)], lm_loss, 1e-3, 1.0)['loss'],
                 graphs=counters['stats']['unique_graphs'], graph_breaks=sum(counters['graph_break'].values()))
    bf16 = (None, MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32))  # CUDA's precision
    policy = build_model(model_args('tiny'), device, seed=0, fsdp=bf16)
    reference = build_reference(model_args('tiny'), device, 1, get_model_state_dict(policy, options=FULL), bf16,
                                dtype=torch.bfloat16)
    probe.update(reference_layout=layout(reference), reference_bytes=local_bytes(reference.parameters()),
                 policy_bytes=local_bytes(policy.parameters()))
    with torch.no_grad():
        policy_logps, reference_logps = policy.token_logprobs(x, x), reference.token_logprobs(x, x)
    probe.update(reference_max_diff=(policy_logps - reference_logps).abs().max().item())
    if rank == 0:
        Path(sys.argv[1]).write_text(json.dumps(probe))
    torch.distributed.destroy_process_group()
