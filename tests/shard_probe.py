"""Run by tests/test_dryrun.py under torchrun (gloo): build the tiny model and its optimizer as a
training stage does, take one step, and write rank 0's parameter layout and bytes to argv[1] (JSON)."""
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from model import model_args  # noqa: E402
from trainer import build_model, build_optimizer, lm_loss, setup_distributed, train_step  # noqa: E402


def layout(model):
    """{parameter name: [placements, local shape, dtype]}: how a rank holds each parameter."""
    return {name: [str(p.placements), list(p.to_local().shape), str(p.dtype)] for name, p in model.named_parameters()}


def local_bytes(tensors):
    return sum(t.to_local().nbytes if hasattr(t, 'to_local') else t.nbytes for t in tensors)


if __name__ == '__main__':
    rank, world_size, device = setup_distributed()
    model = build_model(model_args('tiny'), device, seed=0)
    optimizer = build_optimizer(model, 1e-3, 0.1, (0.9, 0.95), 1e-8, device)
    x = torch.randint(0, 256, (2, 16))
    train_step(model, optimizer, [(x, x)], lm_loss, 1e-3, 1.0)
    if rank == 0:
        state = [t for s in optimizer.state.values() for t in s.values()]
        Path(sys.argv[1]).write_text(json.dumps({'layout': layout(model),
                                                 'params': local_bytes(model.parameters()),
                                                 'optimizer': local_bytes(state)}))
    torch.distributed.destroy_process_group()
