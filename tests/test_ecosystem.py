"""torch.compile (no graph break, same numbers), AMP, DDP with synced statistics, reports."""
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

import lomix_kernels as lk
from lomix_kernels import cpu

from conftest import make_logits, make_target, randomize_params, rel_err, run, triton_available

needs_cpu = pytest.mark.skipif(not cpu.available(), reason=cpu.unavailable_reason())

FUSED = ["cpu"] + (["triton"] if triton_available() else [])  # triton: through the interpreter here


class TinyHeads(nn.Module):
    """Three 1×1-conv heads at 1/4, 1/2, 1/1 resolution, coarse -> fine."""

    def __init__(self, cin=3, C=4):
        super().__init__()
        self.heads = nn.ModuleList(nn.Conv2d(cin, C, 1) for _ in range(3))

    def forward(self, x):
        return [h(nn.functional.avg_pool2d(x, 2 ** (2 - i)) if i < 2 else x) for i, h in enumerate(self.heads)]


@needs_cpu
@pytest.mark.parametrize("backend,weighting", [("cpu", "softplus"), ("reference", "softplus"),
                                               ("cpu", "uncertainty")])  # triton: test_triton
def test_compile_no_graph_break_same_results(backend, weighting):
    torch.manual_seed(0)
    model, crit = TinyHeads(), randomize_params(lk.LoMixLoss(3, 4, backend=backend, weighting=weighting))
    x, y = torch.randn(2, 3, 16, 16), make_target(4, 2, (16, 16))

    def step(x, y):
        return crit(model(x), y)

    eager = step(x, y)
    g_eager = torch.autograd.grad(eager, list(model.parameters()) + list(crit.parameters()))
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(step)(x, y)
    assert explanation.graph_break_count == 0, [b.reason for b in explanation.break_reasons]
    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True)
    out = compiled(x, y)
    g_comp = torch.autograd.grad(out, list(model.parameters()) + list(crit.parameters()))
    assert rel_err(out, eager) < 1e-5
    for a, b in zip(g_comp, g_eager):
        assert rel_err(a, b) < 1e-5


@needs_cpu
@pytest.mark.parametrize("backend", FUSED)
def test_custom_ops_pass_opcheck(backend):
    from lomix_kernels.fused import Plan, packed_params

    if backend == "cpu":
        from lomix_kernels.functional import CPU_STATS_OP as op
    else:
        from lomix_kernels.triton_backend import STATS_OP as op
    crit = randomize_params(lk.LoMixLoss(3, 3, backend=backend))
    logits = [z.detach().contiguous() for z in make_logits(3, 3, 2, (6, 5), native=True)]
    params = [p.detach() for p in packed_params(crit.maps, 3, 3, crit.cat_weight, crit.cat_bias, crit.awf_weight,
                                                crit.awf_bias, "official", torch.device("cpu"))]
    tables, meta = Plan.build(crit.maps, 3, 3, crit.options(), "official").to_lists()
    args = (logits, make_target(3, 2, (6, 5)), None, *params, tables, meta)
    torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))


@needs_cpu
def test_autocast_bf16():
    torch.manual_seed(0)
    model, crit = TinyHeads(), randomize_params(lk.LoMixLoss(3, 4, backend="cpu"))
    x, y = torch.randn(2, 3, 16, 16), make_target(4, 2, (16, 16))
    ref = crit(model(x), y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(x)
        assert logits[0].dtype == torch.bfloat16
        for z in logits:
            z.retain_grad()
        loss = crit(logits, y)
    assert loss.dtype == torch.float32
    loss.backward()
    assert all(z.grad.dtype == torch.bfloat16 for z in logits)
    assert rel_err(loss.detach(), ref.detach()) < 2e-2  # bf16 logits, float32 accumulation


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, world, port, backend, weighting, result_path):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        crit = randomize_params(lk.LoMixLoss(3, 4, backend=backend, sync_stats=True, ignore_index=255,
                                             weighting=weighting))
        logits = make_logits(3, 4, 4, (12, 10), native=True)
        target = make_target(4, 4, (12, 10), ignore_index=255)
        local = [z.detach()[rank * 2:(rank + 1) * 2].clone().requires_grad_() for z in logits]
        loss, grads, pgrads = run(crit, local, target[rank * 2:(rank + 1) * 2])
        for g in pgrads.values():  # the shares of every rank sum to the single-process gradient
            dist.all_reduce(g)
        torch.save({"loss": loss, "grads": grads, "pgrads": pgrads}, f"{result_path}.{rank}")
        dist.barrier()  # both ranks done before the group is torn down
    finally:
        dist.destroy_process_group()
    # Skip interpreter teardown: a gloo thread occasionally aborts there ("terminate called without
    # an active exception") after all the work is done and saved.
    os._exit(0)


@needs_cpu
@pytest.mark.parametrize("backend,weighting", [("cpu", "softplus"), ("reference", "softplus"),
                                               ("cpu", "uncertainty"), ("reference", "normalized")])
def test_ddp_sync_stats_equals_single_process(tmp_path, backend, weighting):
    """Every weighting: θ's gradient share per rank sums to the single-process gradient (the
    uncertainty regularizer's too)."""
    world = 2
    path = str(tmp_path / "ddp")
    mp.spawn(_ddp_worker, args=(world, _free_port(), backend, weighting, path), nprocs=world, join=True)
    crit = randomize_params(lk.LoMixLoss(3, 4, backend=backend, ignore_index=255, weighting=weighting))
    logits = make_logits(3, 4, 4, (12, 10), native=True)
    loss, grads, pgrads = run(crit, logits, make_target(4, 4, (12, 10), ignore_index=255))
    for rank in range(world):
        r = torch.load(f"{path}.{rank}")
        assert rel_err(r["loss"], loss) < 1e-6
        for g_local, g_full in zip(r["grads"], grads):
            assert rel_err(g_local, g_full[rank * 2:(rank + 1) * 2]) < 1e-5
        for name, g in pgrads.items():
            assert rel_err(r["pgrads"][name], g) < 1e-5, name


def test_sync_stats_without_process_group_says_so():
    crit = lk.LoMixLoss(3, 4, backend="reference", sync_stats=True)
    with pytest.raises(RuntimeError, match="process group"):
        crit(make_logits(3, 4, 1, (4, 4)), make_target(4, 1, (4, 4)))


def test_report_and_plots(tmp_path):
    crit = randomize_params(lk.LoMixLoss(3, 4, backend="reference"))
    crit(make_logits(3, 4, 2, (6, 6)), make_target(4, 2, (6, 6)))
    rows = crit.report()
    assert [r["name"] for r in rows] == crit.map_names
    assert rows[3]["op"] == "add" and rows[3]["subset"] == (0, 1)
    assert abs(rows[0]["ell"] - float(crit.last_terms["ell"][0])) < 1e-6
    sums = lk.report.operator_weights(crit)
    assert set(sums) == {"orig", "add", "mult", "awf", "cat"}
    assert abs(sum(sums.values()) - float(crit.weights().detach().sum())) < 1e-4
    hist = lk.report.WeightHistory()
    for step in range(3):
        hist.update(crit, step)
    assert len(hist.operator_series()["cat"]) == 3
    lk.report.plot_weights(crit, str(tmp_path / "w.png"))
    hist.plot(str(tmp_path / "h.png"))
    assert (tmp_path / "w.png").stat().st_size > 1000 and (tmp_path / "h.png").stat().st_size > 1000
    assert "orig_0" in lk.report.format_table(crit)
