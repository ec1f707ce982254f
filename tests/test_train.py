"""Training CLI: a few steps, resume equality, bad input, eval, compare."""

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


def test_killed_run_resumes_from_its_checkpoint(tmp_path, corpus):
    """A process killed mid-run leaves a whole checkpoint; --resume picks it up."""
    out = tmp_path / "killed"
    code = f"""
import sys, os
from flash_depth.train import loop
original = loop.write_checkpoint
def crash_after_first(*args, **kwargs):
    original(*args, **kwargs)
    os._exit(9)  # killed right after the first checkpoint
loop.write_checkpoint = crash_after_first
from flash_depth.cli import main
main({["train", "--out", str(out), "--max-steps", "6", "--device", "cpu", f"data.source={corpus}",
       f"data.cache_dir={tmp_path / 'cache'}", *TINY, "train.checkpoint_every=2"]!r})
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 9, proc.stderr[-2000:]
    assert (out / "checkpoint" / "trainer_state.pt").exists()
    assert cli(["train", "--out", str(out), "--resume", "--max-steps", "6", "--device", "cpu",
                f"data.source={corpus}", f"data.cache_dir={tmp_path / 'cache'}", *TINY]) == 0
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
    assert code == 2 and "depth_mechanism" in capsys.readouterr().err


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
    with pytest.raises(SystemExit):
        cli(["train", "--out", str(tmp_path / "c"), "--bogus"])
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
