"""Interleaved ratios to cuDNN in 60 and 100 ms turns against the ratios timed apart (each
provider alone for a second, its last half timed, three times), phi-3's forward at 8k; two of each.

Usage (on a GPU, FA4 installed): python benchmarks/turn_check.py OUT.json
It wrote benchmarks/results/turns-8k-h200.json, the reason `measure.timing.TURN_MS` is 100.
"""
import json, statistics, sys
import torch
from dkbench.spec.load import load_spec
from dkbench.spec.sweep import expand
from dkbench.measure import runner
from dkbench.measure.check import random_inputs
from dkbench.measure.envinfo import environment
from dkbench.measure.timing import measure_interleaved, CudaClock

dev = torch.device("cuda", 0)
sweep = load_spec("sweeps/phi3.yaml")
names = ["sdpa_cudnn", "dkbench", "fa4_sparse", "sdpa_flash", "fa4"]
out = {}
for case in expand(sweep):
    if case.mode != "fwd" or case.seqlen != 8192:
        continue
    ctx = runner.RunContext(sweep, dev, environment(dev), "p", "sdpa_cudnn", "")
    layout = case.pattern.layout(case.heads, case.kv_heads, case.seqlen, case.causal)
    seed = runner.case_seed(sweep, case)
    inputs = random_inputs(case, dev, False, seed)
    ready = [runner.prepare_one(ctx, case, n, layout, 0.5, inputs, seed + 1) for n in names]
    steps = {r.row.provider: r.step for r in ready if isinstance(r, runner.ReadyStep)}
    res = {}
    for rep in range(2):
        for turn in (60.0, 100.0):
            t = measure_interleaved(steps, sweep.timing.eager_pass(), dev, "sdpa_cudnn", turn_ms=turn)
            res.setdefault(f"turn{turn:g}", []).append({n: 1 / r.median for n, r in t.ratios.items()})
        apart = {}
        for _ in range(3):
            for n, fn in steps.items():
                clock = CudaClock(dev)
                ms0 = clock.read([clock.call(fn)])[0]
                calls = max(4, int(1000 / ms0))
                hs = [clock.call(fn) for _ in range(calls)]
                ts = clock.read(hs)[calls // 2:]
                apart.setdefault(n, []).append(statistics.median(ts))
        base = statistics.median(apart["sdpa_cudnn"])
        res.setdefault("apart", []).append({n: statistics.median(v) / base for n, v in apart.items()})
    out[case.seqlen] = res
    print(case.seqlen, json.dumps(res), flush=True)
    del ready, steps, inputs
    torch.cuda.empty_cache()
json.dump(out, open(sys.argv[1], "w"), indent=1)
