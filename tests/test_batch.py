"""`qconv batch`: job files (YAML, CSV) validated up front, idempotent re-runs decided from the artifact's
manifest, local spawn workers, a failing job that does not stop the others, and Ray tasks on a local cluster."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from io import StringIO
from pathlib import Path

import pytest
import yaml

from qconv import batch
from qconv.batch import BatchDisplay, decide, execute_job, load_jobs

from conftest import tiny_model


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory, tokenizer_files) -> Path:
    return tiny_model(tmp_path_factory.mktemp("tiny"), "llama", tokenizer_files)


# The tiny model's 49152-token embedding and head are most of its weights: keep them F16 so GGUF jobs take seconds.
GGUF_SMALL = {"token_embedding_type": "F16", "output_tensor_type": "F16"}


def write_yaml(path: Path, jobs: list[dict], defaults: dict | None = None) -> Path:
    data = {"defaults": defaults, "jobs": jobs} if defaults else jobs
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def run_one(job, force: bool = False) -> tuple[dict, list]:
    """A job run in this process (the worker's own function, without the process around it)."""
    events: list = []
    return execute_job(job, force, events.append), events


def no_leftovers(folder: Path) -> None:
    assert not [p.name for p in folder.iterdir() if ".qconv-tmp-" in p.name or ".qconv-old-" in p.name]


# --- the job file ---------------------------------------------------------------------------------------------


def test_yaml_and_csv_describe_the_same_jobs(tmp_path, monkeypatch):
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "m").mkdir()
    y = write_yaml(
        tmp_path / "jobs.yaml",
        [
            {"model": "models/m", "output": "out/a", "ignore": ["mlp\\.down", "q_proj"], "sym": False},
            {"model": "org/hub-model", "output": "out/b.gguf", "format": "gguf", "gguf_type": "q4_k_m",
             "tensor_type": ["attn_v=Q6_K"], "name": "b", "cpus": 2},
        ],
        defaults={"bits": 4, "group_size": 32},
    )  # fmt: skip
    c = tmp_path / "jobs.csv"
    c.write_text(
        "model,output,bits,group_size,ignore,sym,format,gguf_type,tensor_type,name,cpus\n"
        'models/m,out/a,4,32,"mlp\\.down;q_proj",false,,,,,\n'
        "org/hub-model,out/b.gguf,4,32,,,gguf,q4_k_m,attn_v=Q6_K,b,2\n"
    )
    monkeypatch.chdir("/")  # relative paths are the job file's, not the working directory's
    jy, jc = load_jobs(y), load_jobs(c)
    assert [j.argv for j in jy] == [j.argv for j in jc]
    assert [j.cfg for j in jy] == [j.cfg for j in jc] and [j.run for j in jy] == [j.run for j in jc]
    a, b = jy
    assert a.model == str(tmp_path / "models" / "m") and a.output == str(tmp_path / "out" / "a")
    assert b.model == "org/hub-model"  # a hub id stays a hub id
    assert (a.cfg.symmetric, a.cfg.ignore, a.name) == (False, ("mlp\\.down", "q_proj"), "a")
    assert b.cfg.format_options["tensor_type"] == ("attn_v=Q6_K",) and b.cpus == 2.0
    assert a.argv[:5] == ["qconv", "quantize", a.model, "--out", a.output] and "--asym" in a.argv


BAD = [
    ("jobs.yaml", "- model: m\n  output: o\n  group_sise: 32\n", ["jobs.yaml:3: job 1", "unknown field 'group_sise'",
                                                                  "did you mean 'group_size'"]),
    ("jobs.yaml", "- model: m\n  output: o\n- model: m\n  output: p\n  bits: four\n",
     ["jobs.yaml:5: job 2", "field 'bits'", "expected an integer"]),
    ("jobs.yaml", "- model: m\n", ["jobs.yaml:1: job 1", "field 'output' is required"]),
    ("jobs.yaml", "- model: m\n  output: o\n  method: zap\n", ["job 1", "field 'method'", "'zap' is not a method"]),
    ("jobs.yaml", "- model: m\n  output: o\n  gguf_type: Q4_0\n", ["jobs.yaml:3: job 1", "field 'gguf_type'",
                                                                  "applies to format gguf"]),
    ("jobs.yaml", "- {model: m, output: o.gguf, format: gguf, gguf_type: Q9_9}\n", ["field 'gguf_type'", "Q9_9"]),
    ("jobs.yaml", "- model: m\n  output: o\n  options: {zzz: 1}\n", ["jobs.yaml:3: job 1", "field 'options'", "zzz"]),
    ("jobs.yaml", "- model: m\n  output: o\n  damp: 0.1\n", ["field 'damp'", "applies to method gptq"]),
    ("jobs.yaml", "- model: m\n  output: o\n  method: gptq\n  static_groups: true\n", ["field 'static_groups'"]),
    ("jobs.yaml", "- model: m\n  output: o\n  method: gptq\n  no_calib: true\n", ["field 'no_calib'", "needs calib"]),
    ("jobs.yaml", "- model: m\n  output: o\n  device: tpu\n", ["field 'device'", "cpu or cuda"]),
    ("jobs.yaml", "- model: m\n  output: o\n  cpus: 0\n", ["field 'cpus'", "greater than 0"]),
    ("jobs.yaml", "- model: m\n  output: o\n- model: m2\n  output: ./o\n", ["jobs.yaml:3: job 2", "field 'output'",
                                                                         "also the output of job 1"]),
    ("jobs.yaml", "- model: m\n  output: o\n  bits: 4\n  bits: 3\n", ["jobs.yaml:4", "'bits' given twice"]),
    ("jobs.yaml", "- model: m\n  output: [o\n", ["jobs.yaml:", "not valid YAML"]),
    ("jobs.yaml", "defaults: {bitz: 4}\njobs:\n- {model: m, output: o}\n", ["jobs.yaml:1: defaults", "'bitz'"]),
    ("jobs.yaml", "jobs: []\n", ["jobs.yaml: no jobs"]),
    ("jobs.yaml", "- just a string\n", ["jobs.yaml: job 1", "expected a mapping"]),
    ("jobs.csv", "model,output,bitz\nm,o,4\n", ["jobs.csv:1", "unknown column 'bitz'", "did you mean 'bits'"]),
    ("jobs.csv", "model,output,sym\nm,o,true\nm,p,maybe\n", ["jobs.csv:3: job 2", "field 'sym'", "true or false"]),
    ("jobs.csv", "model,output\nm,o,extra\n", ["jobs.csv:2", "3 cells"]),
    ("jobs.txt", "model,output\n", ["jobs.txt", ".yaml, .yml, .json or .csv"]),
]  # fmt: skip


@pytest.mark.parametrize("name, text, needles", BAD, ids=[f"{i}-{b[2][-1][:24]}" for i, b in enumerate(BAD)])
def test_bad_job_file_exits_2_naming_file_and_field(cli, tmp_path, name, text, needles):
    f = tmp_path / name
    f.write_text(text)
    r = cli("batch", f, "--json")
    assert r.code == 2, (r.code, r.stderr)
    errors = [line for line in r.stderr.splitlines() if line.startswith("qconv: error: ")]
    assert len(errors) == 1, r.stderr
    assert str(f) in errors[0] or f.name in errors[0]
    for n in needles:
        assert n in errors[0], errors[0]
    assert r.json() == {"ok": False, "exit_code": 2, "error": errors[0].removeprefix("qconv: error: ")}
    assert not (tmp_path / "o").exists()


def test_options_forms_and_jobs_flag(cli, tmp_path):
    # CSV cells give "KEY=VALUE;KEY=VALUE"; YAML a mapping (values as --opt would give them) or a list
    assert batch._options("a=1; b=x;") == batch._options({"a": 1, "b": "x"}) == {"a": "1", "b": "x"}
    assert batch._options(["flag=true"]) == batch._options({"flag": True}) == {"flag": "true"}
    f = write_yaml(tmp_path / "jobs.yaml", [{"model": "m", "output": "o"}])
    r = cli("batch", f, "--jobs", 0)
    assert r.code == 2 and "--jobs 0: must be at least 1" in r.stderr


def test_missing_job_file(cli, tmp_path):
    r = cli("batch", tmp_path / "nope.yaml")
    assert r.code == 2 and "nope.yaml: no such job file" in r.stderr


# --- is the artifact up to date? (the worker's function, in this process) ---------------------------------------


def test_rerun_skips_and_changed_settings_rerun(tiny_llama, tmp_path):
    spec = {"model": str(tiny_llama), "output": "out/w4", "group_size": 32}
    (job,) = load_jobs(write_yaml(tmp_path / "jobs.yaml", [spec]))
    r, events = run_one(job)
    assert r["status"] == "ok" and r["reason"] == "new", r
    kinds = [e[0] for e in events]
    assert kinds[0] == "start" and "task" in kinds and "advance" in kinds  # progress travels as events
    out = Path(job.output)
    manifest = json.loads((out / "qconv.json").read_text())
    assert manifest["command"] == job.argv  # the equivalent quantize command is the recorded provenance
    first = (out / "model.safetensors").stat().st_mtime_ns

    r, _ = run_one(job)
    assert (r["status"], r["reason"]) == ("skipped", "up to date")
    assert (out / "model.safetensors").stat().st_mtime_ns == first

    (job,) = load_jobs(write_yaml(tmp_path / "jobs.yaml", [{**spec, "group_size": 64}]))
    r, _ = run_one(job)
    assert r["status"] == "ok" and "group_size 32 → 64" in r["reason"], r
    assert json.loads((out / "qconv.json").read_text())["config"]["group_size"] == 64
    no_leftovers(out.parent)
    assert decide(job).run is False


def test_changed_method_option_reruns(tiny_llama, tmp_path, monkeypatch):
    """A --opt value (``options:``) is part of the recorded config: changing one re-runs the job."""
    from qconv.methods import METHODS
    from qconv.methods.rtn import RTN
    from qconv.options import Option

    class RTNWithOption(RTN):
        name = "rtn-test-opt"
        options = (Option("passes", int, 1, "a setting that only has to be recorded"),)

    monkeypatch.setitem(METHODS, RTNWithOption.name, RTNWithOption)
    spec = {"model": str(tiny_llama), "output": "o", "method": RTNWithOption.name, "group_size": 64, "bits": 8}
    (job,) = load_jobs(write_yaml(tmp_path / "jobs.yaml", [{**spec, "options": {"passes": 2}}]))
    assert job.cfg.opts == {"passes": "2"} and "--opt" in job.argv and "passes=2" in job.argv
    assert run_one(job)[0]["status"] == "ok"
    assert decide(job).reason == "up to date"
    (same,) = load_jobs(write_yaml(tmp_path / "jobs.yaml", [{**spec, "options": ["passes=2"]}]))
    assert decide(same).run is False  # the same value written another way
    (job,) = load_jobs(write_yaml(tmp_path / "jobs.yaml", [{**spec, "options": {"passes": 3}}]))
    d = decide(job)
    assert d.run and d.replace and "passes 2 → 3" in d.reason, d
    r, _ = run_one(job)
    assert r["status"] == "ok"
    assert json.loads((tmp_path / "o" / "qconv.json").read_text())["config"]["method_options"]["passes"] == 3


def test_changed_input_version_or_damaged_artifact_reruns(tiny_llama, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(tiny_llama, model)
    spec = {"model": "model", "output": "q8.gguf", "format": "gguf", "gguf_type": "Q8_0", **GGUF_SMALL}
    (job,) = load_jobs(write_yaml(tmp_path / "jobs.yaml", [spec]))
    assert run_one(job)[0]["status"] == "ok"
    assert decide(job).run is False
    mpath = tmp_path / "q8.gguf.qconv.json"

    # same size, different bytes: only the digest tells
    st = model / "model.safetensors"
    data = bytearray(st.read_bytes())
    data[-1] ^= 0x01
    st.write_bytes(bytes(data))
    assert decide(job).reason == "input changed: model.safetensors"
    assert run_one(job)[0]["status"] == "ok"
    assert decide(job).run is False

    m = json.loads(mpath.read_text())
    mpath.write_text(json.dumps({**m, "qconv_version": "0.0.1"}))
    assert decide(job).reason.startswith("qconv version 0.0.1 → ")
    mpath.write_text(json.dumps(m))

    with open(tmp_path / "q8.gguf", "r+b") as f:
        f.truncate(1000)
    assert decide(job).reason.startswith("artifact incomplete")


def test_eval_is_part_of_being_up_to_date(tiny_llama, tmp_path):
    spec = {"model": str(tiny_llama), "output": "o", "bits": 8, "group_size": -1, "eval": True, "eval_chunks": 2,
            "eval_ctx": 64}  # fmt: skip
    (job,) = load_jobs(write_yaml(tmp_path / "jobs.yaml", [spec]))
    r, _ = run_one(job)
    assert r["status"] == "ok", r
    ev = r["summary"]["eval"]
    assert (ev["chunks"], ev["ctx"]) == (2, 64) and ev["ppl"] > 1
    assert json.loads((tmp_path / "o" / "qconv.json").read_text())["eval"]["chunks"] == 2
    assert decide(job).run is False
    (job,) = load_jobs(write_yaml(tmp_path / "jobs.yaml", [{**spec, "eval_chunks": 3}]))
    assert decide(job).reason == "no evaluation with these settings in the manifest"
    (job,) = load_jobs(write_yaml(tmp_path / "jobs.yaml", [{k: v for k, v in spec.items() if "eval" not in k}]))
    assert decide(job).run is False  # no eval asked: the one recorded does not matter


def test_example_job_file_is_valid():
    jobs = load_jobs(Path(__file__).resolve().parent.parent / "examples" / "jobs.yaml")
    assert [(j.method, j.format) for j in jobs] == [("rtn", "safetensors"), ("gptq", "safetensors"), ("rtn", "gguf")]
    assert all(j.cfg.calib_samples == 32 and j.cpus == 1 for j in jobs)


def test_output_that_is_not_an_artifact_needs_force(tiny_llama, tmp_path):
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "precious.txt").write_text("not ours")
    (job,) = load_jobs(write_yaml(tmp_path / "jobs.yaml", [{"model": str(tiny_llama), "output": "o", "bits": 8,
                                                             "group_size": -1}]))  # fmt: skip
    r, _ = run_one(job)
    assert r["status"] == "failed" and r["exit_code"] == 2
    assert "is not a qconv artifact" in r["error"] and "--force" in r["error"]
    assert (tmp_path / "o" / "precious.txt").exists()
    r, _ = run_one(job, force=True)
    assert r["status"] == "ok" and r["reason"] == "--force"
    assert not (tmp_path / "o" / "precious.txt").exists() and (tmp_path / "o" / "qconv.json").exists()


# --- display --------------------------------------------------------------------------------------------------


def fake_jobs(n: int):
    return [batch.Job(i, f"f:{i}", f"job[{i}]", "m", f"/o{i}", type("C", (), {"method": "rtn", "format": "gguf"})(),
                      None, None, None, 0.0, []) for i in range(1, n + 1)]  # fmt: skip


def result(i: int, status: str, **kw) -> dict:
    fields = {"index": i, "name": f"job[{i}]", "output": f"/o{i}", "method": "rtn", "format": "gguf", "seconds": 1.5}
    return {**fields, "status": status, **{k: kw.get(k) for k in ("reason", "error", "summary")}}


def feed(d: BatchDisplay) -> None:
    d.event(("start", 1))
    d.event(("task", 1, "quantizing layers", 4))
    d.event(("advance", 1, 3, "layer 2"))
    d.event(("log", 1, "[bold]qconv[/] rtn → gguf"))
    d.event(("start", 2))
    d.event(("done", 2, result(2, "failed", error="/m: no such file [Errno 2]")))
    d.event(("done", 3, result(3, "skipped", reason="up to date")))


def test_display_on_a_terminal_shows_every_job():
    from rich.console import Console

    buf = StringIO()
    console = Console(file=buf, force_terminal=True, width=140, color_system=None)
    d = BatchDisplay(fake_jobs(3), console=console)
    with d:
        feed(d)
        assert d.state[1]["done"] == 3 and d.state[1]["total"] == 4
        row = next(t for t in d._progress.tasks if t.id == d._rows[1])
        assert (row.completed, row.total) == (3, 4) and "quantizing layers 3/4" in row.fields["detail"]
        d.event(("done", 1, result(1, "ok", summary={"output": "/o1", "bits_per_weight": 4.5})))
        overall = next(t for t in d._progress.tasks if t.id == d._overall)
        assert overall.completed == 3 and overall.fields["detail"] == "1 ok · 1 skipped · 1 failed"
    failed = result(2, "failed", error="/m: no such file [Errno 2]")
    d.summary_table([result(1, "ok", summary={"output": "/o1", "bits_per_weight": 4.5}), failed,
                     result(3, "skipped", reason="up to date")])  # fmt: skip
    text = buf.getvalue()
    for needle in ("[1/3] job[1]", "[2/3] job[2]", "failed: /m: no such file [Errno 2]", "qconv rtn → gguf",
                   "up to date", "4.5", "1 ok · 1 skipped · 1 failed"):  # fmt: skip
        assert needle in text, needle


def test_display_in_logs_prints_job_lines_and_heartbeat():
    from rich.console import Console

    buf = StringIO()
    d = BatchDisplay(fake_jobs(3), console=Console(file=buf, width=200), heartbeat=0.0)
    with d:
        feed(d)
        d.tick()
    lines = buf.getvalue().splitlines()
    assert "[1/3] job[1]: started" in lines
    assert "[1/3] job[1]: quantizing layers 3/4 (0 s)" in lines
    assert "[2/3] job[2]: failed: /m: no such file [Errno 2]" in lines
    assert "[3/3] job[3]: skipped (up to date)" in lines
    assert BatchDisplay(fake_jobs(1), quiet=True, console=Console(file=StringIO())).live is False


def test_crashed_worker_is_reported(tmp_path):
    (job,) = fake_jobs(1)
    log = tmp_path / "job.log"
    log.write_text("warning: something\nFatal Python error: Segmentation fault\n\n")
    r = batch._crashed(job, -11, time.perf_counter(), log)
    assert r["status"] == "failed" and r["exit_code"] == 1
    assert r["error"] == "worker process killed by SIGSEGV; its last output: Fatal Python error: Segmentation fault"
    assert "out of memory" in batch._crashed(job, -9, time.perf_counter(), tmp_path / "none")["error"]


# --- the command, with worker processes ------------------------------------------------------------------------


@pytest.mark.slow
def test_batch_yaml_two_workers_then_rerun(cli, tiny_llama, tmp_path):
    jobs = [
        {"model": str(tiny_llama), "output": "out/w4g32", "group_size": 32},
        {"model": str(tiny_llama), "output": "out/q8.gguf", "format": "gguf", "gguf_type": "Q8_0", **GGUF_SMALL},
    ]
    f = write_yaml(tmp_path / "jobs.yaml", jobs)
    r = cli("batch", f, "--jobs", 2, "--json")
    assert r.code == 0, r.stderr
    s = r.json()
    assert s["counts"] == {"ok": 2, "skipped": 0, "failed": 0} and s["runner"] == "local ×2"
    a, b = s["jobs"]
    assert a["worker"]["pid"] != b["worker"]["pid"] != os.getpid()
    # two workers: the jobs ran at the same time
    assert a["started_at"] < b["started_at"] + b["seconds"] and b["started_at"] < a["started_at"] + a["seconds"]
    assert "[1/2] w4g32: started" in r.stderr and "qconv batch" in r.stderr  # job lines, then the table

    # the batch job is exactly `qconv quantize` with the same settings
    direct = tmp_path / "direct"
    assert cli("quantize", tiny_llama, "--group-size", 32, "--out", direct, "--quiet").code == 0
    out = tmp_path / "out"
    assert (out / "w4g32" / "model.safetensors").read_bytes() == (direct / "model.safetensors").read_bytes()
    assert (out / "q8.gguf").is_file() and (out / "q8.gguf.qconv.json").is_file()

    r = cli("batch", f, "--jobs", 2, "--json")
    assert r.code == 0 and [j["status"] for j in r.json()["jobs"]] == ["skipped", "skipped"], r.stderr

    jobs[1]["gguf_type"] = "Q4_0"
    write_yaml(f, jobs)
    r = cli("batch", f, "--json")
    assert r.code == 0, r.stderr
    a, b = r.json()["jobs"]
    assert a["status"] == "skipped" and b["status"] == "ok" and "gguf_type Q8_0 → Q4_0" in b["reason"]
    assert json.loads((out / "q8.gguf.qconv.json").read_text())["config"]["format_options"]["gguf_type"] == "Q4_0"
    no_leftovers(out)


@pytest.mark.slow
def test_batch_csv_failing_job_does_not_stop_the_others(cli, tiny_llama, tmp_path):
    f = tmp_path / "jobs.csv"
    f.write_text(
        f"name,model,output,bits,group_size\nmissing,./no-such-model,out/a,4,32\nfine,{tiny_llama},out/b,8,-1\n"
    )
    r = cli("batch", f, "--json")
    assert r.code == 1, r.stderr
    s = r.json()
    assert s["ok"] is False and s["exit_code"] == 1 and s["counts"] == {"ok": 1, "skipped": 0, "failed": 1}
    bad, good = s["jobs"]
    assert bad["status"] == "failed" and bad["exit_code"] == 2
    assert bad["error"] == f"{tmp_path / 'no-such-model'}: no such file or directory"
    assert good["status"] == "ok" and (tmp_path / "out" / "b" / "qconv.json").is_file()
    assert not (tmp_path / "out" / "a").exists()
    assert f"[1/2] missing: failed: {bad['error']}" in r.stderr
    assert re.search(r"│ 1 │ missing .*│ failed │", r.stderr), r.stderr  # the summary table
    no_leftovers(tmp_path / "out")


@pytest.mark.slow
def test_killed_worker_fails_alone(tiny_llama, tmp_path):
    """A worker killed mid-job (as by the out-of-memory killer) fails that job only; its temporary output goes."""
    import psutil

    jobs = [
        # Q8_0 for the 49152-row embedding and head too: the slowest job the tiny model makes
        {"model": str(tiny_llama), "output": "out/victim.gguf", "format": "gguf", "gguf_type": "Q8_0"},
        {"model": str(tiny_llama), "output": "out/next", "bits": 8, "group_size": -1},
    ]
    f = write_yaml(tmp_path / "jobs.yaml", jobs)
    qconv = str(Path(sys.executable).with_name("qconv"))
    p = subprocess.Popen([qconv, "batch", str(f), "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out = tmp_path / "out"
    deadline = time.time() + 300
    while time.time() < deadline and not (out.is_dir() and [x for x in out.iterdir() if ".qconv-tmp-" in x.name]):
        time.sleep(0.1)
    workers = [c for c in psutil.Process(p.pid).children() if "spawn_main" in " ".join(c.cmdline())]
    assert len(workers) == 1, workers  # --jobs 1: the victim's worker alone
    workers[0].kill()
    stdout, stderr = p.communicate(timeout=400)
    assert p.returncode == 1, stderr
    victim, nxt = json.loads(stdout)["jobs"]
    assert victim["status"] == "failed" and victim["error"].startswith("worker process killed by SIGKILL"), victim
    assert nxt["status"] == "ok" and (out / "next" / "qconv.json").is_file()
    assert not (out / "victim.gguf").exists()
    no_leftovers(out)


# --- Ray ------------------------------------------------------------------------------------------------------


@pytest.fixture
def ray_cluster():
    """A one-node Ray cluster started for the test (`ray start --head --block`); stopping that process stops the
    cluster's own processes, and no other Ray instance on the machine is touched."""
    pytest.importorskip("ray")
    ray_bin = Path(sys.executable).with_name("ray")
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    temp = tempfile.mkdtemp(prefix="qr", dir="/tmp")  # Ray's unix sockets live here: paths of ≤ 107 bytes
    proc = subprocess.Popen(
        [str(ray_bin), "start", "--head", "--block", "--port=0", "--num-cpus=2", "--num-gpus=0",
         "--include-dashboard=false", "--object-store-memory=100000000", f"--temp-dir={temp}"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True,
    )  # fmt: skip
    address, seen = None, []
    deadline = time.time() + 120
    while address is None and time.time() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        seen.append(line)
        m = re.search(r"--address='([^']+)'", line)
        address = m.group(1) if m else None
    if address is None:
        proc.kill()
        pytest.fail("ray start did not report an address:\n" + "".join(seen[-30:]))
    try:
        yield address
    finally:
        os.killpg(proc.pid, 15)  # the group this test started
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()
        shutil.rmtree(temp, ignore_errors=True)


@pytest.mark.slow
def test_batch_on_a_ray_cluster(ray_cluster, tiny_llama, tmp_path):
    f = write_yaml(
        tmp_path / "jobs.yaml",
        [
            {"model": str(tiny_llama), "output": "out/w8", "bits": 8, "group_size": -1, "cpus": 1},
            {"model": str(tiny_llama), "output": "out/gpu", "gpus": 1},
        ],
    )
    cmd = [str(Path(sys.executable).with_name("qconv")), "batch", str(f), "--ray", ray_cluster, "--json"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=540)
    assert p.returncode == 1, p.stderr
    s = json.loads(p.stdout)
    assert s["runner"] == f"ray {ray_cluster}"
    ok, gpu = s["jobs"]
    assert ok["status"] == "ok", ok
    assert ok["worker"]["pid"] != os.getpid() and (tmp_path / "out" / "w8" / "qconv.json").is_file()
    assert gpu["status"] == "failed" and "needs 1 CPU and 1 GPU on one node" in gpu["error"]
    assert not (tmp_path / "out" / "gpu").exists()

    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert p.returncode == 1
    assert json.loads(p.stdout)["jobs"][0]["status"] == "skipped"
