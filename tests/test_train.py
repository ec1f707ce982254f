"""Training CLI: a few steps, resume equality, bad input, eval, compare."""

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from flash_depth.cli import main as cli
from flash_depth.data.sources import DataError, load_documents, shakespeare_plays, strip_play_markdown
from flash_depth.train.config import ConfigError, load_config

TINY = ["model.num_hidden_layers=2", "model.hidden_size=32", "model.intermediate_size=64", "train.seq_len=32",
        "train.batch_size=4", "train.eval_every=3", "train.eval_batches=2", "train.log_every=1", "data.vocab_size=300"]


def _train(out, corpus, *extra, steps=6):
    args = ["train", "--out", str(out), "--max-steps", str(steps), "--device", "cpu",
            f"data.source={corpus}", f"data.cache_dir={out.parent / 'cache'}", *TINY, *extra]
    return cli(args)


def _losses(run):
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in records if "loss" in r]


def test_train_writes_checkpoint_metrics_and_plot(tmp_path, corpus):
    out = tmp_path / "run"
    assert _train(out, corpus) == 0
    ckpt = out / "checkpoint"
    for name in ("model.safetensors", "config.json", "tokenizer.json", "trainer_state.pt", "run_config.yaml"):
        assert (ckpt / name).exists(), name
    assert (out / "loss.png").stat().st_size > 1000
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 6 and summary["final_val_loss"] is not None
    losses = [loss for _, loss in _losses(out)]
    assert losses[-1] < losses[0]


def test_resume_continues_the_same_loss_curve(tmp_path, corpus):
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert _train(straight, corpus, steps=8) == 0
    assert _train(split, corpus, "train.checkpoint_every=4", steps=4) == 0  # as if killed after step 4
    assert cli(["train", "--out", str(split), "--resume", "--max-steps", "8", "--device", "cpu",
                f"data.source={corpus}", f"data.cache_dir={tmp_path / 'cache'}", *TINY]) == 0
    a, b = dict(_losses(straight)), dict(_losses(split))
    for step in range(5, 9):
        assert abs(a[step] - b[step]) < 1e-5, (step, a[step], b[step])


def _records(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_killed_run_resumes_with_each_step_logged_once(tmp_path, corpus):
    """A process killed (SIGKILL) after logging step 3, past its step-2 checkpoint, and resumed:
    metrics.jsonl holds every step once, and the summary counts all 6 steps."""
    out = tmp_path / "killed"
    code = f"""
import os, signal
from flash_depth.train import loop
real, calls = loop.set_lr, []
def set_lr(*args):
    calls.append(1)
    if len(calls) == 4:  # the start of step 4: steps 1-3 are logged, the checkpoint is step 2's
        os.kill(os.getpid(), signal.SIGKILL)
    real(*args)
loop.set_lr = set_lr
from flash_depth.cli import main
main({["train", "--out", str(out), "--max-steps", "6", "--device", "cpu", f"data.source={corpus}",
       f"data.cache_dir={tmp_path / 'cache'}", *TINY, "train.checkpoint_every=2", "train.eval_every=1"]!r})
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert [r["step"] for r in _records(out) if "loss" in r] == [1, 2, 3]
    with (out / "metrics.jsonl").open("a") as fh:
        fh.write('{"step": 4, "lo')  # a record the kill cut short
    assert cli(["train", "--out", str(out), "--resume", "--device", "cpu"]) == 0
    records = _records(out)
    for kind in ("loss", "val_loss"):
        assert [r["step"] for r in records if kind in r] == [1, 2, 3, 4, 5, 6], kind
    assert json.loads((out / "summary.json").read_text())["steps"] == 6


def test_metrics_of_a_resumed_run_read_once_per_step(tmp_path):
    """A run killed past its checkpoint logs those steps again after --resume: the curves take
    the resumed run's record of each step, in step order; the file itself keeps everything."""
    from flash_depth.train.plots import read_metrics

    killed = [{"step": s, "loss": 10.0 - s} for s in (1, 2, 3, 4)] + [{"step": 2, "val_loss": 9.0}]
    resumed = [{"step": s, "loss": 20.0 - s} for s in (3, 4, 5)] + [{"step": 4, "val_loss": 8.0}]
    lines = [json.dumps(r) for r in killed + resumed]
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    train, val = read_metrics(tmp_path)
    assert [(r["step"], r["loss"]) for r in train] == [(1, 9.0), (2, 8.0), (3, 17.0), (4, 16.0), (5, 15.0)]
    assert [(r["step"], r["val_loss"]) for r in val] == [(2, 9.0), (4, 8.0)]
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == len(lines)


def test_existing_output_is_never_overwritten(tmp_path, corpus, capsys):
    out = tmp_path / "run"
    assert _train(out, corpus, steps=2) == 0
    before = (out / "checkpoint" / "model.safetensors").read_bytes()
    assert _train(out, corpus, steps=2) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert (out / "checkpoint" / "model.safetensors").read_bytes() == before


def test_resume_with_another_architecture_is_refused(tmp_path, corpus, capsys):
    out = tmp_path / "run"
    assert _train(out, corpus, steps=2) == 0
    code = cli(["train", "--out", str(out), "--resume", "--max-steps", "4", "--device", "cpu",
                f"data.source={corpus}", f"data.cache_dir={tmp_path / 'cache'}", *TINY, "model.depth_mechanism=residual"])
    assert code == 2 and "model.depth_mechanism is 'moda' in the run but 'residual'" in capsys.readouterr().err


@pytest.mark.parametrize("content,msg", [
    (b"", "holds no text"),
    (b"\x00\x01\x02binary", "looks binary"),
    (b"\xff\xfe\xfa not utf8", "not UTF-8"),
])
def test_bad_data_files(tmp_path, content, msg):
    f = tmp_path / "bad.txt"
    f.write_bytes(content)
    with pytest.raises(DataError, match=msg):
        load_documents(str(f))


def test_bad_data_sources_and_cli_errors(tmp_path, capsys):
    with pytest.raises(DataError, match="does not exist"):
        load_documents(str(tmp_path / "missing.txt"))
    bad_jsonl = tmp_path / "bad.jsonl"
    bad_jsonl.write_text('{"text": "fine"}\n{"text": \n')
    with pytest.raises(DataError, match="bad.jsonl:2 is not valid JSON"):
        load_documents(str(bad_jsonl))
    no_field = tmp_path / "nofield.jsonl"
    no_field.write_text('{"body": "x"}\n')
    with pytest.raises(DataError, match="no string field 'text'"):
        load_documents(str(no_field))
    assert cli(["train", "--out", str(tmp_path / "r"), f"data.source={tmp_path / 'missing'}"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="unknown config key 'model.depth_mechansim'"):
        load_config(None, ["model.depth_mechansim=moda"])
    with pytest.raises(ConfigError, match="unknown config key 'train.lr_peak'"):
        load_config(None, ["train.lr_peak=1"])
    with pytest.raises(ConfigError, match="train.max_steps must be int"):
        load_config(None, ["train.max_steps=ten"])
    bad = tmp_path / "c.yaml"
    bad.write_text("optimizer:\n  lr: 1\n")
    with pytest.raises(ConfigError, match="unknown section 'optimizer'"):
        load_config(bad)
    good = tmp_path / "g.yaml"
    good.write_text("model:\n  preset: tiny\n  depth_mechanism: attnres_block\n  attnres_blocks: 4\ntrain:\n  lr: 1\n")
    cfg = load_config(good, ["train.max_steps=7", "train.min_lr=3e-5"])
    assert cfg.model["depth_mechanism"] == "attnres_block" and cfg.train.lr == 1.0 and cfg.train.max_steps == 7
    assert cfg.train.min_lr == 3e-5


def test_cuda_graph_is_refused_where_it_cannot_run(tmp_path, corpus, capsys):
    """train.cuda_graph needs one CUDA GPU: on CPU it stops before writing anything."""
    out = tmp_path / "graphed"
    assert _train(out, corpus, "train.cuda_graph=true") != 0
    assert "train.cuda_graph=true needs one CUDA GPU" in capsys.readouterr().err
    assert not out.exists()
    from flash_depth.train.cuda_graph import GraphedStep

    with pytest.raises(ValueError, match="warmup must be an int >= 1"):
        GraphedStep(lambda batch: batch, warmup=0)
    with pytest.raises(TypeError, match="batch must be a CUDA tensor, got Tensor on cpu"):
        GraphedStep(lambda batch: batch)(torch.zeros(2, 3, dtype=torch.long))


def test_optimizer_settings_for_captured_steps():
    """A graphed run keeps each learning rate as a tensor updated in place and a capturable
    optimizer; a run resumed from its checkpoint without the graph gets floats back, and the
    other way round."""
    from flash_depth.train.cuda_graph import prepare_for_capture, set_lr

    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=0.25)
    prepare_for_capture(opt, torch.device("cpu"))
    lr = opt.param_groups[0]["lr"]
    assert isinstance(lr, torch.Tensor) and lr.item() == 0.25 and opt.param_groups[0]["capturable"]
    set_lr(opt, 0.5)
    assert opt.param_groups[0]["lr"] is lr and lr.item() == 0.5
    opt.load_state_dict(opt.state_dict())
    prepare_for_capture(opt, None)
    assert opt.param_groups[0]["lr"] == 0.5 and not opt.param_groups[0]["capturable"]
    set_lr(opt, 0.125)
    assert opt.param_groups[0]["lr"] == 0.125


def test_cli_takes_overrides_before_and_after_options(tmp_path, capsys):
    # The late override is parsed (it fails as an unknown key), and so is the early one.
    assert cli(["train", "train.max_steps=1", "--out", str(tmp_path / "a"), "model.nope=1"]) == 2
    assert "unknown config key 'model.nope'" in capsys.readouterr().err
    assert cli(["train", "train.nope=1", "--out", str(tmp_path / "b")]) == 2
    assert "unknown config key 'train.nope'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as stop:
        cli(["train", "--out", str(tmp_path / "c"), "--bogus"])
    assert stop.value.code == 2
    assert capsys.readouterr().err == ("flash-depth train: error: unrecognized arguments: --bogus "
                                       "(see flash-depth train --help)\n")
    assert not any(tmp_path.iterdir())  # nothing written for a rejected command


def test_eval_and_compare(tmp_path, corpus, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    assert _train(a, corpus, steps=4) == 0
    assert _train(b, corpus, "model.depth_mechanism=residual", steps=4) == 0
    capsys.readouterr()
    assert cli(["eval", str(a / "checkpoint"), "--seq-len", "32", "--device", "cpu"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["perplexity"] > 1 and 0 < result["bits_per_byte"] < 20 and result["tokens"] > 0
    assert cli(["compare", str(a), str(b), "--out", str(tmp_path / "cmp.png")]) == 0
    table = (tmp_path / "cmp.md").read_text()
    assert "| a | moda |" in table and "| b | residual |" in table
    assert (tmp_path / "cmp.png").stat().st_size > 1000
    assert cli(["eval", str(tmp_path / "nothing")]) == 2


def test_embedded_corpus_is_clean_text():
    plays = shakespeare_plays()
    assert len(plays) >= 36
    text = dict(plays)["twelfth-night"]
    assert "If music be the food of love, play on;" in text
    assert "**" not in text and "\n#" not in text
    assert strip_play_markdown("**ROMEO**  \nHello  \n_Exit_\n") == "ROMEO:\nHello\n[Exit]\n"


def test_tokenize_then_train_from_bin_shards(tmp_path, corpus):
    shards = tmp_path / "shards"
    assert cli(["tokenize", "--data", str(corpus), "--out", str(shards), "--vocab-size", "300",
                "--shard-tokens", "2000"]) == 0
    meta = json.loads((shards / "meta.json").read_text())
    assert len(meta["shards"]) > 1 and meta["dtype"] == "uint16"
    out = tmp_path / "run"
    assert cli(["train", "--out", str(out), "--max-steps", "3", "--device", "cpu", f"data.source={shards}",
                *[t for t in TINY if not t.startswith("data.")]]) == 0
    (shards / "shard_00000.bin").write_bytes(b"\x01\x02\x03")  # odd byte count: corrupt
    with pytest.raises(DataError, match="not a whole number"):
        from flash_depth.data.sources import load_token_shards

        load_token_shards(str(shards))


def test_torchrun_ddp_two_processes(tmp_path, corpus):
    """Two CPU processes (gloo) under torchrun: each reads its own batches, gradients all-reduced."""
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
           "-m", "flash_depth.train", "--out", str(out), "--max-steps", "3", "--device", "cpu",
           f"data.source={corpus}", f"data.cache_dir={tmp_path / 'cache'}", *TINY]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["tokens"] == 3 * 2 * 4 * 32


def test_default_config_is_the_shipped_tiny_config():
    from pathlib import Path

    shipped = Path(__file__).parent.parent / "configs" / "tiny-shakespeare.yaml"
    assert load_config(None).to_dict() == load_config(shipped).to_dict()
    for path in shipped.parent.glob("*.yaml"):
        load_config(path)  # every shipped config is valid


def test_lm_eval_adapter_on_a_local_task(tmp_path, corpus, capsys):
    """lm-evaluation-harness through our HFLM adapter agrees with log-likelihoods computed by hand."""
    pytest.importorskip("lm_eval")
    import torch

    from flash_depth.eval.lm_harness import hf_tokenizer, run_multiple_choice
    from flash_depth.models import FlashDepthForCausalLM

    out = tmp_path / "run"
    assert _train(out, corpus, steps=3) == 0
    ckpt = out / "checkpoint"
    task = Path(__file__).parent / "data" / "tiny_mc.jsonl"
    result = run_multiple_choice(ckpt, task, work_dir=tmp_path / "tasks", device="cpu")
    model, tok = FlashDepthForCausalLM.from_pretrained(ckpt).eval(), hf_tokenizer(ckpt)
    correct = 0
    records = [json.loads(line) for line in task.read_text().splitlines()]
    for rec in records:
        scores = []
        for choice in rec["choices"]:
            whole = tok(rec["question"] + choice)["input_ids"]
            n_ctx = len(tok(rec["question"])["input_ids"])
            with torch.no_grad():
                logp = model(torch.tensor([whole])).logits.log_softmax(-1)[0]
            scores.append(sum(logp[i - 1, whole[i]].item() for i in range(n_ctx, len(whole))))
        correct += int(max(range(len(scores)), key=scores.__getitem__) == rec["answer"])
    assert result["n"] == len(records)
    assert abs(result["acc"] - correct / len(records)) < 1e-9
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q", "choices": ["a"], "answer": 3}\n')
    with pytest.raises(ValueError, match="answer"):
        run_multiple_choice(ckpt, bad, work_dir=tmp_path / "t2", device="cpu")


def test_build_corpus_script_on_a_fake_package_tree(tmp_path):
    """The mixed-corpus script on a hand-made unpacked tree (CI does not download packages)."""
    import gzip

    tree = tmp_path / "packages"
    (tree / "usr/share/dictd").mkdir(parents=True)
    (tree / "usr/share/dictd/gcide.dict.dz").write_bytes(gzip.compress(b"Depth \\Depth\\, n.\n  Deepness.\n" * 50))
    html_dir = tree / "usr/share/doc/python3.11/html/library"
    html_dir.mkdir(parents=True)
    (html_dir / "os.html").write_text('<div role="navigation">index | next</div><h1>os</h1><p>Operating system '
                                      "interfaces &amp; more.</p><script>var x;</script>")
    kdoc = tree / "usr/share/doc/linux-doc-6.1/Documentation/process"
    kdoc.mkdir(parents=True)
    (kdoc / "howto.rst").write_text("How to do Linux kernel development\n===\n")
    (tree / "usr/share/doc/linux-doc-6.1/Documentation/translations").mkdir()
    (tree / "usr/share/doc/linux-doc-6.1/Documentation/translations/x.rst").write_text("not English")
    script = Path(__file__).parent.parent / "scripts" / "build_corpus.py"
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(script), "--out", str(out), "--packages-dir", str(tree),
                           "--vocab-size", "300", "--max-mb", "1"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    records = [json.loads(line) for line in (out / "corpus.jsonl").read_text().splitlines()]
    sources = {r["source"] for r in records}
    assert sources == {"gcide", "python-doc", "linux-doc", "shakespeare"}
    py = next(r["text"] for r in records if r["source"] == "python-doc")
    assert "Operating system interfaces & more." in py and "index | next" not in py and "var x" not in py
    assert not any("not English" in r["text"] for r in records)
    assert json.loads((out / "shards" / "meta.json").read_text())["tokens"] > 0


def test_study_script_smoke(tmp_path, corpus):
    """scripts/study.py with the shipped study config, shrunk to 2 steps per model (the study
    itself runs on a GPU); a second call skips the finished models."""
    script = Path(__file__).parent.parent / "scripts" / "study.py"
    config = Path(__file__).parent.parent / "configs" / "study" / "depth-mechanisms.yaml"
    import yaml

    study = yaml.safe_load(config.read_text())
    study["models"] = study["models"][:2] + [m for m in study["models"] if m["name"] == "attnres-block8"][:1]
    study["common"]["data"]["cache_dir"] = str(tmp_path / "cache")
    study["common"]["data"]["vocab_size"] = 300
    small = tmp_path / "study.yaml"
    small.write_text(yaml.safe_dump(study))
    out = tmp_path / "study"
    cmd = [sys.executable, str(script), "--config", str(small), "--out", str(out), "--smoke",
           "--data", str(corpus), "--device", "cpu"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads((out / "results.json").read_text())
    assert len(rows) == 4  # residual-pre has two seeds
    assert {r["mechanism"] for r in rows} == {"residual", "attnres_block"}
    assert (out / "val_curves_small-48.png").exists() and "final val loss" in (out / "results.md").read_text()
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "== " not in again.stderr  # nothing retrained


# ---------------------------------------------------------------- a training CLI that never silently does the wrong thing
ROOT = Path(__file__).parent.parent


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished 4-step run (checkpoints at steps 2 and 4) that tests copy; its corpus and
    tokenizer cache are shared, so resuming a copy trains no tokenizer."""
    import numpy as np

    base = tmp_path_factory.mktemp("finished")
    docs = base / "docs"
    docs.mkdir()
    words = np.array(["depth", "attention", "layer", "token", "residual", "stream", "softmax", "query", "key"])
    for i in range(4):
        (docs / f"d{i}.txt").write_text(" ".join(np.random.default_rng(i).choice(words, 800)) + "\n")
    assert _train(base / "run", docs, "train.checkpoint_every=2", "train.eval_every=2", steps=4) == 0
    return base / "run"


def _copy(run, tmp_path):
    import shutil

    return Path(shutil.copytree(run, tmp_path / run.name))


def _error_line(capsys) -> str:
    """The one line a user fault prints: nothing else on stderr, no traceback."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "past_key_values" not in line]  # transformers 5.24's own warning
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_readme_resume_pair(tmp_path, finished, monkeypatch, capsys):
    """The README's two commands, the first interrupted after its first checkpoint: the second
    (no --config) continues the run as the first set it up."""
    from flash_depth.train import loop

    data = load_config(finished / "run_config.yaml").data
    small = ["model.num_hidden_layers=2", "model.hidden_size=96", "model.intermediate_size=64", "train.compile=false",
             "train.cuda_graph=false", "train.seq_len=32", "train.batch_size=2", "train.max_steps=4",
             "train.checkpoint_every=2", "train.eval_every=2", "train.eval_batches=1", "train.log_every=1",
             f"data.source={data.source}", f"data.cache_dir={data.cache_dir}", "data.vocab_size=300"]
    real = loop.write_checkpoint

    def interrupted_after_saving(*args):
        real(*args)
        raise KeyboardInterrupt

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(loop, "write_checkpoint", interrupted_after_saving)
    assert cli(["train", "--config", str(ROOT / "configs/small-48-moda-post.yaml"), "--out", "runs/moda",
                "model.norm_position=pre", *small]) == 130
    monkeypatch.undo()
    monkeypatch.chdir(tmp_path)
    saved = (tmp_path / "runs/moda/run_config.yaml").read_bytes()
    assert cli(["train", "--out", "runs/moda", "--resume"]) == 0
    summary = json.loads((tmp_path / "runs/moda/summary.json").read_text())
    assert (summary["steps"], summary["norm_position"], summary["layers"]) == (4, "pre", 2)
    assert (tmp_path / "runs/moda/run_config.yaml").read_bytes() == saved
    assert [r["step"] for r in _records(tmp_path / "runs/moda") if "loss" in r] == [1, 2, 3, 4]


def test_resume_refuses_a_changed_setting(tmp_path, finished, capsys):
    out = _copy(finished, tmp_path)
    saved = (out / "run_config.yaml").read_bytes()
    assert cli(["train", "--out", str(out), "--resume", "--max-steps", "6", "train.seq_len=64", "train.lr=1e-3"]) == 2
    line = _error_line(capsys)
    assert "train.seq_len is 32 in the run but 64 was given" in line and "train.lr is 0.002 in the run but 0.001" in line
    other = tmp_path / "other.yaml"
    other.write_text("model:\n  depth_mechanism: residual\n")
    assert cli(["train", "--out", str(out), "--resume", "--config", str(other), "--max-steps", "6"]) == 2
    assert "model.depth_mechanism is 'moda' in the run but 'residual'" in _error_line(capsys)
    assert (out / "run_config.yaml").read_bytes() == saved and not (out / "resumes.jsonl").exists()


def test_resume_extends_max_steps(tmp_path, finished, capsys):
    """--max-steps (and settings a resume may change) apply; the same value of any other is fine;
    run_config.yaml keeps the start's config and resumes.jsonl records the change."""
    out = _copy(finished, tmp_path)
    saved = (out / "run_config.yaml").read_bytes()
    assert cli(["train", "--out", str(out), "--resume", "--max-steps", "6", "train.seq_len=32", "train.eval_every=3",
                "--device", "cpu"]) == 0
    assert json.loads((out / "summary.json").read_text())["steps"] == 6
    assert (out / "run_config.yaml").read_bytes() == saved
    assert load_config(out / "checkpoint" / "run_config.yaml").train.max_steps == 6
    resumed = json.loads((out / "resumes.jsonl").read_text())
    assert resumed["step"] == 4 and resumed["changes"] == {"train.max_steps": [4, 6], "train.eval_every": [2, 3]}
    assert [r["step"] for r in _records(out) if "val_loss" in r] == [2, 4, 6]
    capsys.readouterr()
    assert cli(["train", "--out", str(out), "--resume"]) == 2
    assert "at step 6 of train.max_steps=6; pass --max-steps N (N > 6)" in _error_line(capsys)


def _poison_gradients(monkeypatch, bad_backward):
    """An inf gradient (finite loss) in lm_head at the backward passes ``bad_backward(i)`` picks
    (1-based); returns the list that receives the model."""
    from flash_depth.train import loop

    real, models, calls = loop._wrap, [], []

    def wrap(model, *args):
        def hook(grad):
            calls.append(1)
            return torch.full_like(grad, float("inf")) if bad_backward(len(calls)) else grad

        model.lm_head.weight.register_hook(hook)
        models.append(model)
        return real(model, *args)

    monkeypatch.setattr(loop, "_wrap", wrap)
    return models


class _Terminal(io.StringIO):
    """A stderr that says it is a terminal (tqdm draws its bar)."""

    def isatty(self):
        return True


def test_nonfinite_gradient_stops_the_run_below_the_progress_bar(tmp_path, corpus, monkeypatch):
    """train.nonfinite=stop (the default): the step with an inf gradient is not applied (the
    weights in memory equal the step-2 checkpoint's), nothing is saved, one line names the step
    and the checkpoint, printed below the closed progress bar."""
    from flash_depth.train.checkpoint import load_model

    models = _poison_gradients(monkeypatch, lambda i: i == 3)
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    out = tmp_path / "run"
    assert _train(out, corpus, "train.checkpoint_every=2") == 2
    err = terminal.getvalue()
    assert "| 2/6 [" in err and "Traceback" not in err  # the bar was drawn
    last = err.rstrip("\n").split("\n")[-1]
    assert last.startswith("flash-depth train: error: step 3 had a non-finite gradient (loss ") and "\r" not in last
    assert f"the last good checkpoint is {out / 'checkpoint'}" in last
    assert json.loads((out / "checkpoint" / "complete.json").read_text())["step"] == 2
    saved = load_model(out / "checkpoint").state_dict()
    assert all(torch.equal(saved[k], v) for k, v in models[0].state_dict().items())
    assert [step for step, _ in _losses(out)] == [1, 2]


def test_nonfinite_gradient_skipped(tmp_path, corpus, monkeypatch, capsys):
    """train.nonfinite=skip: the step is skipped and counted; train.max_skips in a row stop the run."""
    _poison_gradients(monkeypatch, lambda i: i == 3)
    out = tmp_path / "skip"
    assert _train(out, corpus, "train.nonfinite=skip") == 0
    assert "step 3 had a non-finite gradient" in capsys.readouterr().err
    assert json.loads((out / "summary.json").read_text())["skipped_steps"] == 1
    records = [r for r in _records(out) if "loss" in r]
    assert [(r["step"], r["skipped_steps"]) for r in records] == [(1, 0), (2, 0), (4, 1), (5, 1), (6, 1)]
    monkeypatch.undo()
    _poison_gradients(monkeypatch, lambda i: i >= 2)
    assert _train(tmp_path / "stuck", corpus, "train.nonfinite=skip", "train.max_skips=2") == 2
    err = capsys.readouterr().err.splitlines()
    assert err[-2].startswith("step 2 had a non-finite gradient") and err[-2].endswith("; update skipped")
    assert err[-1].startswith("flash-depth train: error: step 3 had a non-finite gradient")
    assert err[-1].endswith("after 2 skipped steps in a row (train.max_skips=2), the last good checkpoint is "
                            "none (no checkpoint yet)")


def test_nonfinite_tensors_are_never_saved_nor_evaluated(tmp_path, finished, monkeypatch, capsys):
    """A NaN reaching a checkpoint write is refused (the last good one stays); a checkpoint with a
    NaN weight fails eval and resume with one line naming the file and the weight."""
    from safetensors.torch import load_file, save_file

    from flash_depth.train import loop
    from flash_depth.train.checkpoint import find_checkpoint

    out = _copy(finished, tmp_path)
    real = loop._full_state

    def nan_weight(*args):
        model_state, opt_state = real(*args)
        model_state = dict(model_state, **{"lm_head.weight": model_state["lm_head.weight"] * float("nan")})
        return model_state, opt_state

    monkeypatch.setattr(loop, "_full_state", nan_weight)
    assert cli(["train", "--out", str(out), "--resume", "--max-steps", "5", "--device", "cpu"]) == 2
    assert "not writing the checkpoint of step 5: weight lm_head.weight holds NaN or inf" in _error_line(capsys)
    assert find_checkpoint(out) == out / "checkpoint" and not (out / ".checkpoint-tmp").exists()
    monkeypatch.undo()
    weights = out / "checkpoint" / "model.safetensors"
    tensors = load_file(weights)
    tensors["model.norm.weight"] = torch.full_like(tensors["model.norm.weight"], float("nan"))
    save_file(tensors, weights, metadata={"format": "pt"})
    assert cli(["eval", str(out / "checkpoint"), "--seq-len", "32", "--device", "cpu"]) == 2
    assert f"{weights}: weight model.norm.weight holds NaN or inf" in _error_line(capsys)
    assert cli(["train", "--out", str(out), "--resume", "--max-steps", "5", "--device", "cpu"]) == 2
    assert "model.norm.weight holds NaN or inf" in _error_line(capsys)


@pytest.mark.parametrize("kill_point,found", [
    ("writing the temporary folder", ".checkpoint-tmp"),  # incomplete: the step-4 checkpoint holds
    ("before the renames", ".checkpoint-tmp"),
    ("between the renames", ".checkpoint-tmp"),
    ("before removing the old one", "checkpoint"),
])
def test_checkpoint_survives_a_kill_at_every_point_of_the_swap(tmp_path, finished, monkeypatch, kill_point, found):
    """Killed at each point of the step-5 checkpoint's swap, the run has a complete checkpoint
    (the new one once its temporary folder is whole), and --resume finishes it."""
    import os

    from flash_depth.train import checkpoint
    from flash_depth.train.checkpoint import find_checkpoint, load_trainer_state

    out = _copy(finished, tmp_path)
    real_rename, real_discard, real_fsync = os.rename, checkpoint._discard, checkpoint._fsync

    def rename(src, dst):
        if (kill_point, Path(src).name) in (("before the renames", "checkpoint"),
                                            ("between the renames", ".checkpoint-tmp")):
            raise KeyboardInterrupt
        real_rename(src, dst)

    def discard(folder):
        if kill_point == "before removing the old one" and folder.name == ".checkpoint-old":
            raise KeyboardInterrupt
        real_discard(folder)

    def fsync(path):
        if kill_point == "writing the temporary folder" and path.name == "trainer_state.pt":
            raise KeyboardInterrupt
        real_fsync(path)

    monkeypatch.setattr(os, "rename", rename)
    monkeypatch.setattr(checkpoint, "_discard", discard)
    monkeypatch.setattr(checkpoint, "_fsync", fsync)
    assert cli(["train", "--out", str(out), "--resume", "--max-steps", "5", "--device", "cpu"]) == 130
    monkeypatch.undo()
    assert (out / found).exists()
    ckpt = find_checkpoint(out)
    expected = 4 if kill_point == "writing the temporary folder" else 5
    assert load_trainer_state(ckpt)["step"] == expected and ckpt.name in ("checkpoint", found)
    assert cli(["train", "--out", str(out), "--resume", "--max-steps", "6", "--device", "cpu"]) == 0
    assert sorted(p.name for p in out.iterdir() if "checkpoint" in p.name) == ["checkpoint"]
    assert load_trainer_state(out / "checkpoint")["step"] == 6
    assert [r["step"] for r in _records(out) if "loss" in r] == [1, 2, 3, 4, 5, 6]


@pytest.mark.parametrize("error,message", [
    (OSError(28, "No space left on device"), "disk full while writing {tmp}/trainer_state.pt"),
    (OSError(30, "Read-only file system"), "cannot write {tmp}/trainer_state.pt: read-only file system"),
    (PermissionError(13, "Permission denied"), "cannot write {tmp}/trainer_state.pt: permission denied"),
    # safetensors and tokenizers (Rust) name the errno only in their message
    (RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)"),
     "disk full while writing {tmp}/model.safetensors"),
])
def test_failed_checkpoint_write_is_one_line_and_keeps_the_last_one(tmp_path, finished, monkeypatch, capsys,
                                                                    error, message):
    from flash_depth.models import FlashDepthForCausalLM
    from flash_depth.train.checkpoint import find_checkpoint, load_model, load_trainer_state

    out = _copy(finished, tmp_path)

    def fail(*args, **kwargs):
        raise error

    monkeypatch.setattr(FlashDepthForCausalLM if "safetensors" in message else torch,
                        "save_pretrained" if "safetensors" in message else "save", fail)
    assert cli(["train", "--out", str(out), "--resume", "--max-steps", "5", "--device", "cpu"]) == 2
    monkeypatch.undo()
    assert _error_line(capsys) == "flash-depth train: error: " + message.format(tmp=out / ".checkpoint-tmp")
    assert not (out / ".checkpoint-tmp").exists() and find_checkpoint(out) == out / "checkpoint"
    assert load_trainer_state(out / "checkpoint")["step"] == 4 and load_model(out / "checkpoint") is not None


@pytest.mark.parametrize("name", ["model.safetensors", "trainer_state.pt", "config.json"])
def test_truncated_checkpoint_file_is_named(tmp_path, finished, capsys, name):
    out = _copy(finished, tmp_path)
    path = out / "checkpoint" / name
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    assert cli(["train", "--out", str(out), "--resume", "--max-steps", "5", "--device", "cpu"]) == 2
    assert f"{path} is corrupt or truncated" in _error_line(capsys)
    if name != "trainer_state.pt":  # eval, generate and analyze read the model only
        for command, *options in (["eval", "--device", "cpu"], ["generate", "--device", "cpu"], ["analyze"]):
            assert cli([command, str(out / "checkpoint"), *options]) == 2, command
            assert f"{path} is corrupt or truncated" in _error_line(capsys)


def test_user_faults_are_one_line_errors(tmp_path, finished, monkeypatch, capsys):
    """Each fault a user can cause: exit status 2 and one line on stderr, no traceback."""
    import builtins
    import errno

    data = load_config(finished / "run_config.yaml").data
    fast = ["--device", "cpu", f"data.source={data.source}", f"data.cache_dir={data.cache_dir}", *TINY]
    (tmp_path / "bad.yaml").write_text("train:\n  lr: [1\n")
    (tmp_path / "empty").mkdir()
    (tmp_path / "a-file").write_text("x")
    cases = {
        "argument --max-steps: wants an integer >= 1, got -3": ["train", "--max-steps", "-3", *fast],
        "--device 'gpu0' is not a device": ["train", *fast, "--device", "gpu0"],
        "config file nope.yaml does not exist": ["train", "--config", "nope.yaml"],
        "bad.yaml is not valid YAML at line 3, column 1": ["train", "--config", str(tmp_path / "bad.yaml")],
        f"{tmp_path / 'empty'}: Is a directory": ["train", "--config", str(tmp_path / "empty")],  # an OSError
        "has no .txt, .md or .jsonl files": ["train", *fast, f"data.source={tmp_path / 'empty'}"],
        "train.seq_len=100000 needs 100001 tokens per window": ["train", *fast, "train.seq_len=100000"],
        "--resume needs --out RUN_DIR": ["train", "--resume"],
        "--resume: no checkpoint in": ["train", "--out", str(tmp_path / "none"), "--resume"],
        "is a file, not a run folder": ["train", "--out", str(tmp_path / "a-file"), *fast],
        "train.nonfinite must be 'stop' or 'skip'": ["train", *fast, "train.nonfinite=never"],
        "train.lr must be >= 0": ["train", *fast, "train.lr=-1"],
    }
    if not torch.cuda.is_available():
        cases["--device cuda: no CUDA GPU is visible"] = ["train", *fast, "--device", "cuda"]
    def exit_status(argv):  # argparse reports a bad option value through SystemExit
        try:
            return cli(argv)
        except SystemExit as stop:
            return stop.code

    for expected, argv in cases.items():
        out = [] if "--out" in argv or "--resume" in argv else ["--out", str(tmp_path / "run")]
        assert exit_status([*argv, *out]) == 2, expected
        line = _error_line(capsys)
        assert line.startswith("flash-depth train: error: ") and expected in line, (expected, line)
        assert not (tmp_path / "run").exists(), expected  # nothing written for a refused command

    assert cli(["eval", str(tmp_path / "a-file"), "--device", "cpu"]) == 2
    assert "is a file; give a run folder or its checkpoint/ folder" in _error_line(capsys)

    datasets = pytest.importorskip("datasets")

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'someone/corpus' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    assert cli(["train", "--out", str(tmp_path / "run"), "data.source=hf:someone/corpus"]) == 2
    assert "cannot read Hugging Face dataset hf:someone/corpus (Couldn't reach" in _error_line(capsys)
    monkeypatch.undo()

    real_open = builtins.open

    def read_only(file, mode="r", *args, **kwargs):  # root ignores chmod: refuse writes under the folder here
        if str(file).startswith(str(tmp_path / "ro")) and any(c in mode for c in "wax"):
            raise OSError(errno.EROFS, "Read-only file system", str(file))
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", read_only)
    assert cli(["train", "--out", str(tmp_path / "ro"), *fast]) == 2
    assert "cannot write " + str(tmp_path / "ro" / ".run_config.yaml.tmp") + ": read-only file system" in _error_line(capsys)


def test_progress_lines_off_a_terminal(tmp_path, finished, capsys):
    """stderr not a terminal: plain progress lines (here every step), no bar redraws."""
    out = _copy(finished, tmp_path)
    assert cli(["train", "--out", str(out), "--resume", "--max-steps", "6", "train.progress_every=0",
                "--device", "cpu"]) == 0
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("train: ")]
    assert [line.split()[2] for line in lines] == ["5/6", "6/6"] and "\r" not in err
    assert lines[-1].startswith("train: step 6/6 loss ") and " val " in lines[-1]


def test_tidying_an_interrupted_swap_survives_a_kill_at_every_point(tmp_path, monkeypatch):
    """Each state a swap can leave (each of the three folders absent, complete, or cut short),
    then a kill after every rename or removal while the next write tidies it up: the newest
    complete checkpoint stays findable, and once tidied it is `checkpoint` alone."""
    import itertools
    import os
    import shutil

    from flash_depth.train import checkpoint

    steps = {"checkpoint": 2, ".checkpoint-tmp": 3, ".checkpoint-old": 1}

    class Killed(BaseException):
        pass

    for case, states in enumerate(itertools.product([None, "complete", "cut short"], repeat=3)):
        start = tmp_path / f"case{case}"
        start.mkdir()
        for (name, step), state in zip(steps.items(), states):
            if state:
                (start / name).mkdir()
                (start / name / "trainer_state.pt").write_text("")
                if state == "complete":
                    (start / name / checkpoint.MARKER).write_text(json.dumps({"step": step}))
        newest = checkpoint.find_checkpoint(start)
        expected = checkpoint._complete_step(newest) if newest else None
        for kill_at in range(5):
            run = Path(shutil.copytree(start, tmp_path / f"case{case}-{kill_at}"))
            calls = []

            def counted(real):
                def call(*args):
                    calls.append(1)
                    if len(calls) > kill_at:
                        raise Killed
                    return real(*args)
                return call

            with monkeypatch.context() as m:
                m.setattr(os, "rename", counted(os.rename))
                m.setattr(checkpoint, "_discard", counted(checkpoint._discard))
                try:
                    checkpoint._settle(run)
                except Killed:
                    pass
            found = checkpoint.find_checkpoint(run)
            assert (checkpoint._complete_step(found) if found else None) == expected, (states, kill_at)
        checkpoint._settle(start)
        assert sorted(p.name for p in start.iterdir()) == (["checkpoint"] if newest else []), states


def test_checkpoint_files_and_folders_are_synced(tmp_path, monkeypatch):
    from flash_depth.data.tokenizer import ByteTokenizer
    from flash_depth.models import FlashDepthConfig, FlashDepthForCausalLM
    from flash_depth.train import checkpoint

    model = FlashDepthForCausalLM(FlashDepthConfig.from_preset("tiny", num_hidden_layers=1, vocab_size=256))
    opt = torch.optim.AdamW(model.parameters())
    synced, real = [], checkpoint._fsync
    monkeypatch.setattr(checkpoint, "_fsync", lambda path: synced.append(path.name) or real(path))
    for step in (1, 2):
        checkpoint.write_checkpoint(tmp_path, model, model.state_dict(), opt.state_dict(),
                                    {"step": step, "torch_rng": torch.get_rng_state()}, ByteTokenizer(), {})
    files = {p.name for p in (tmp_path / "checkpoint").iterdir()} - {checkpoint.MARKER}
    assert files <= set(synced) and {".checkpoint-tmp", tmp_path.name} <= set(synced)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]
    assert checkpoint.load_trainer_state(tmp_path / "checkpoint")["step"] == 2


def test_train_accepts_mudd(tmp_path, corpus):
    """model.depth_mechanism=mudd trains (and checkpoints) through the CLI like the other mechanisms."""
    out = tmp_path / "run"
    assert _train(out, corpus, "model.depth_mechanism=mudd", steps=2) == 0
    assert json.loads((out / "checkpoint" / "config.json").read_text())["depth_mechanism"] == "mudd"
