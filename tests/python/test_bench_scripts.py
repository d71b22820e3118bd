# SPDX-License-Identifier: MIT
"""Smoke runs of the Python benchmarks in bench/python (docs/python.md, "Benchmarks"): a tiny
shape, a few repetitions, so that CI keeps the scripts, their C++ program and their
same-function checks working. No timing is asserted (the figures of a smoke run mean nothing).
And scripts/bench_ggml_peer.py's logic on a fake peer (ggml is not built in CI)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "bench" / "python"


def run(script, *args, timeout=900):
    r = subprocess.run([sys.executable, str(BENCH / script), *args], cwd=ROOT, stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, text=True, timeout=timeout)
    assert r.returncode == 0, f"{script} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}"
    return r.stdout


def table_rows(out):
    return [line for line in out.splitlines() if line.startswith("| ") and not line.startswith("| tokens")]


def test_bench_binding_smoke(tmp_path):
    out_json = tmp_path / "binding.json"
    # Builds the C++ program in build/bench_python (as a real run does; incremental afterwards).
    out = run("bench_binding.py", "--shape", "32,4,8,2", "--tokens", "1,5", "--threads", "1,2", "--rounds", "1",
              "--repetitions", "2", "--min-time", "0.005", "--json", str(out_json))
    data = json.loads(out_json.read_text())
    calls = {"cpp_forward", "cpp_forward_nostats", "numpy, out=y", "numpy", "torch, out=y", "dmoe.torch.MoE"}
    cases = {(r["tokens"], r["threads"], r["call"]) for r in data["rows"]}
    assert cases == {(t, th, c) for t in (1, 5) for th in (1, 2) for c in calls}
    assert len(table_rows(out)) == len(cases)
    for r in data["rows"]:
        assert r["wall_us"] > 0 and r["samples"] >= 2
        assert (r["overhead_wall_us"] is None) == r["call"].startswith("cpp")
        assert (r["cpu_us"] is None) == (r["threads"] != 1)
        assert r["f"] == pytest.approx(2 / 4)


def test_bench_module_overhead_smoke():
    out = run("bench_module_overhead.py", "--shape", "16,3,4,2", "--calls", "20", "--rounds", "1")
    rows = [line for line in out.splitlines() if line.endswith(" us")]
    assert [line.split("  ")[0] for line in rows] == [
        "MoELayer.forward (NumPy views)", "dmoe.torch.MoE forward (autograd)", "dmoe.torch.MoE forward (no_grad)"]
    assert all(float(line.split()[-2]) > 0 for line in rows)


def test_bench_train_step_smoke(tmp_path):
    out_json = tmp_path / "train.json"
    out = run("bench_train_step.py", "--shape", "24,6,8,2", "--tokens", "20", "--threads", "1", "--steps", "3",
              "--block", "2", "--warmup", "1", "--json", str(out_json))
    data = json.loads(out_json.read_text())
    # one thread only: on a loaded CI machine torch's 2-thread steps are slow, and the script's
    # thread handling is the same for every count
    assert [r["threads"] for r in data["rows"]] == [1]
    assert len(table_rows(out)) == 1
    for lab in ("small", "benchmark"):
        # the script refuses to time two implementations that differ; its checks ran and passed
        assert data["checks"][lab] and max(data["checks"][lab].values()) <= 1e-4
        assert {"y", "dx", "grad w1", "grad w2", "grad router_weight", "y after AdamW step"} <= set(data["checks"][lab])
    for r in data["rows"]:
        assert r["dmoe_ms"] > 0 and r["torch_ms"] > 0
        assert all(len(s) == 3 for s in r["samples"].values())
        assert r["f"] == pytest.approx(2 / 6)


def test_bench_train_step_check_detects_a_different_function(monkeypatch):
    """The same-function check must be able to fail: a loop that does not renormalize the top-k
    weights computes another function and must be caught."""
    monkeypatch.syspath_prepend(str(BENCH))
    import bench_train_step as bts

    orig = bts.LoopMoE.__init__

    def wrong_init(self, src):
        orig(self, src)
        self.renormalize = not self.renormalize

    monkeypatch.setattr(bts.LoopMoE, "__init__", wrong_init)
    _, bad = bts.check_same_function(12, 6, 5, 2, 37, threads=1, tol=1e-4)
    assert "y" in bad and "dx" in bad


@pytest.mark.parametrize("runs, dtype", [("moe_", "float32"), ("infer_top_k_bf16_tiles", "bfloat16")])
def test_bench_torch_peer_smoke(tmp_path, runs, dtype):
    """scripts/bench_torch_peer.py on a hand-made benchmark JSON: picks the runs named by --runs
    (not the others), times the loop in --dtype and prints one row per run."""
    name = runs if runs != "moe_" else "moe_top_k"
    fake = {
        "context": {"dmoe_shape": "S: d 768, 24 experts x 128, relu", "date": "now", "host_name": "test"},
        "benchmarks": [
            {"name": f"{name}/tokens:{t}/threads:1/k:2/real_time", "run_name": f"{name}/tokens:{t}/threads:1/k:2/real_time",
             "run_type": "iteration", "real_time": 1000.0, "time_unit": "us", "mean_k": 2.0}
            for t in (1, 4)
        ] + [{"name": "infer_top_k/tokens:4/threads:1/k:2/real_time", "run_type": "iteration", "real_time": 5.0,
              "time_unit": "us", "mean_k": 2.0}],
    }
    path = tmp_path / "fwd.json"
    path.write_text(json.dumps(fake))
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_torch_peer.py"), "--runs", runs, "--dtype", dtype,
                        "--min-time", "0.001", "--repetitions", "1", str(path)], cwd=ROOT, stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    rows = [line for line in r.stdout.splitlines() if line.startswith("| top_k")]
    assert [row.split("|")[2].strip() for row in rows] == ["1", "4"]
    assert f"torch loop in {dtype}" in r.stdout
    assert all(row.split("|")[6].strip() == "1.00" for row in rows)  # dmoe's time, from the JSON


GGML_FAKE = """#!{python}
# Stands in for bench/ggml's dmoe_ggml_moe: logs its arguments, answers 2.0, 1.0, 3.0 ms in turn.
import json, sys
args = sys.argv[1:]
with open({log!r}, "a") as fh:
    fh.write(" ".join(args) + "\\n")
    fh.flush()
with open({log!r}) as fh:
    calls = len(fh.readlines())
opt = dict(zip(args[::2], args[1::2]))
if opt.get("--tokens") == "999":
    sys.exit("fake peer: refused")
print(json.dumps({{"best_ms": [2.0, 1.0, 3.0][(calls - 1) % 3], "tokens": int(opt["--tokens"])}}))
"""


def bench_json(path, runs):
    """A bench_forward-shaped JSON: one min aggregate per (name, ms)."""
    data = {"context": {"dmoe_shape": "S: d_model 768, 24 experts x 128 (dense hidden 3072), relu, fp32"},
            "benchmarks": [{"name": n, "run_name": n, "run_type": "aggregate", "aggregate_name": "min",
                            "real_time": ms * 1e6, "time_unit": "ns"} for n, ms in runs]}
    path.write_text(json.dumps(data))
    return path


def test_bench_ggml_peer_table(tmp_path):
    """scripts/bench_ggml_peer.py on a fake peer (ggml itself is not built in CI): which cases it
    runs, with which arguments, best and slowest of the processes, the check on the first only."""
    log = tmp_path / "calls.log"
    fake = tmp_path / "fake_peer"
    fake.write_text(GGML_FAKE.format(python=sys.executable, log=str(log)))
    fake.chmod(0o755)
    js = bench_json(tmp_path / "fwd.json", [
        ("infer_top_k_bf16/tokens:1/threads:2/k:6/real_time", 0.5),
        ("infer_top_k/tokens:8/threads:1/k:6/real_time", 0.25),
        ("infer_dynamic_k/tokens:8/threads:1/f_pct:25/real_time", 0.3),  # not a top-k run: not compared
        ("moe_top_k/tokens:8/threads:1/k:6/real_time", 0.4),  # another --runs prefix
    ])
    script = ROOT / "scripts" / "bench_ggml_peer.py"
    r = subprocess.run([sys.executable, str(script), "--ggml", str(fake), "--stat", "min", str(js)], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    rows = [line for line in r.stdout.splitlines() if line.startswith("| infer")]
    # grouped by run, then tokens descending; the fake's best of (2, 1, 3) is 1 ms, its slowest 3 ms
    assert rows == ["| infer_top_k | 8 | 1 | 6 | 0.250 | f32 | 1.00 (3.00) | 4.00 |",
                    "| infer_top_k_bf16 | 1 | 2 | 6 | 0.500 | bf16 | 1.00 (3.00) | 2.00 |"]
    calls = log.read_text().splitlines()
    assert len(calls) == 6  # 3 processes per case
    assert [c.endswith("--check") for c in calls] == [True, False, False] * 2
    assert all("--d 768 --experts 24 --width 128 --act relu --k 6" in c for c in calls)
    assert "--tokens 8 --threads 1" in calls[0] and "--type f32" in calls[0]
    assert "--tokens 1 --threads 2" in calls[3] and "--type bf16" in calls[3]

    # A failing peer stops the table with its message; a missing one says how to build it.
    bad = bench_json(tmp_path / "bad.json", [("infer_top_k/tokens:999/threads:1/k:6/real_time", 1.0)])
    r = subprocess.run([sys.executable, str(script), "--ggml", str(fake), "--stat", "min", str(bad)], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "fake peer: refused" in r.stderr
    r = subprocess.run([sys.executable, str(script), "--ggml", str(tmp_path / "none"), str(js)], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "bench_ggml_peer.sh" in r.stderr
