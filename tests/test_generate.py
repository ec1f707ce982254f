"""Text out of a trained run: special tokens, the generate command, run folders in eval /
analyze / compare, Auto classes after ``import flash_depth``, the CLI's help and errors."""

import io
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from flash_depth.cli import build_parser, main as cli
from flash_depth.data.pipeline import build_token_splits
from flash_depth.data.tokenizer import EOT, ByteTokenizer, load_tokenizer
from flash_depth.eval.generation import TextStream
from flash_depth.train.config import DataConfig

TINY = ["model.num_hidden_layers=2", "model.hidden_size=32", "model.intermediate_size=64", "train.seq_len=32",
        "train.batch_size=4", "train.eval_every=3", "train.eval_batches=2", "data.vocab_size=300"]
WORDS = ["depth", "attention", "layer", "token", "residual", "stream", "softmax", "query", "key", "value"]


def _docs(folder, n=5, words=300):
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        (folder / f"d{i}.txt").write_text(" ".join(rng.choice(WORDS, words)) + "\n")
    return folder


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One tiny run on a 5-document folder, shared by the tests of this file (read-only)."""
    root = tmp_path_factory.mktemp("gen")
    docs = _docs(root / "docs")
    out = root / "run"
    assert cli(["train", "--out", str(out), "--max-steps", "6", "--device", "cpu", f"data.source={docs}",
                f"data.cache_dir={root / 'cache'}", *TINY]) == 0
    return out


def _generate(capsys, *args):
    capsys.readouterr()
    code = cli(["generate", *map(str, args), "--device", "cpu"])
    out = capsys.readouterr()
    assert code == 0, out.err
    return out.out


def test_greedy_output_is_model_generate_decoded(run, capsys):
    """The CLI's greedy text is what model.generate gives for the prompt after BOS, decoded; the
    checkpoint's own tokenizer files and generation config are used to compute it."""
    from transformers import AutoTokenizer

    from flash_depth.models import FlashDepthForCausalLM

    text = _generate(capsys, run, "--prompt", "depth attention", "--temperature", "0", "--max-new-tokens", "12")
    ckpt = run / "checkpoint"
    tok = AutoTokenizer.from_pretrained(ckpt)
    model = FlashDepthForCausalLM.from_pretrained(ckpt).eval()
    ids = torch.tensor([[tok.bos_token_id] + tok("depth attention")["input_ids"]])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=12)
    assert text == "depth attention" + tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True) + "\n"
    # the static cache (what CUDA gets by default) gives the same greedy text
    assert _generate(capsys, run, "--prompt", "depth attention", "--temperature", "0", "--max-new-tokens", "12",
                     "--fast-decode", "on") == text
    # top-k 1 leaves one token to sample: greedy again, whatever the seed
    assert _generate(capsys, run, "--prompt", "depth attention", "--top-k", "1", "--max-new-tokens", "12",
                     "--seed", "5") == text


def test_sampling_with_a_seed_is_reproducible(run, capsys):
    args = (run, "--prompt", "layer", "--temperature", "1.5", "--max-new-tokens", "16")
    first = _generate(capsys, *args, "--seed", "7")
    assert _generate(capsys, *args, "--seed", "7") == first
    assert _generate(capsys, *args, "--seed", "8") != first


def test_prompt_from_stdin_and_empty_prompt(run, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("depth attention"))
    from_stdin = _generate(capsys, run, "--prompt", "-", "--temperature", "0", "--max-new-tokens", "6")
    assert from_stdin == _generate(capsys, run, "--prompt", "depth attention", "--temperature", "0",
                                   "--max-new-tokens", "6")
    assert _generate(capsys, run, "--max-new-tokens", "4", "--seed", "0")  # from BOS alone


def test_generation_stops_at_eos(run, capsys, monkeypatch):
    """A model that always predicts <|endoftext|> stops after one token, with nothing to add to the prompt."""
    from flash_depth.eval import generation

    load = generation.load_for_generation

    def eos_always(checkpoint, device):
        model, tok = load(checkpoint, device)

        def boost(module, inputs, logits):
            logits[..., tok.eos_id] += 1e4
            return logits

        model.lm_head.register_forward_hook(boost)
        return model, tok

    monkeypatch.setattr(generation, "load_for_generation", eos_always)
    assert _generate(capsys, run, "--prompt", "layer", "--seed", "0") == "layer\n"
    assert cli(["generate", str(run), "--prompt", "layer", "--device", "cpu", "--temperature", "0"]) == 0
    assert "[1 token, stopped at <|endoftext|>, greedy]" in capsys.readouterr().err


class _Writes(list):
    """A text file that keeps each write."""

    def write(self, text):
        self.append(text)

    def flush(self):
        pass


def test_stream_writes_text_as_tokens_arrive():
    """Text is written per token; a character split over byte tokens waits until it is whole."""
    writes = _Writes()
    stream = TextStream(ByteTokenizer(), writes, prompt="Hi ")
    stream.put(torch.tensor([[256, 72, 105, 32]]))  # the prompt's ids: its text as given instead
    for b in "hé!".encode():
        stream.put(torch.tensor([b]))
    stream.put(torch.tensor([256]))  # EOS: nothing to show
    stream.end()
    assert [w for w in writes if w] == ["Hi ", "h", "é", "!"]


def test_generated_text_is_streamed_token_by_token(run):
    from flash_depth.eval.generation import generate_ids, load_for_generation

    model, tok = load_for_generation(run, "cpu")
    writes = _Writes()
    ids = [tok.eos_id] + tok.encode("token")
    new = generate_ids(model, tok, ids, max_new_tokens=8, streamer=TextStream(tok, writes))
    assert len([w for w in writes if w]) > 1 and "".join(writes) == tok.decode(new)


@pytest.mark.parametrize("args,says", [
    (["--temperature", "-1"], "argument --temperature: wants a number >= 0, got -1"),
    (["--top-p", "0"], "argument --top-p: wants a number in (0, 1], got 0"),
    (["--top-p", "1.5"], "argument --top-p: wants a number in (0, 1], got 1.5"),
    (["--max-new-tokens", "0"], "argument --max-new-tokens: wants an integer >= 1, got 0"),
    (["--top-k", "x"], "argument --top-k: wants an integer >= 0, got 'x'"),
    (["--prompt", "depth " * 600], "must be shorter than the model's max_position_embeddings=512"),
])
def test_bad_generate_arguments_fail_in_one_line(run, capsys, args, says):
    try:
        code = cli(["generate", str(run), "--device", "cpu", *args])
    except SystemExit as stop:  # argparse
        code = stop.code
    out = capsys.readouterr()
    err = out.err.strip()
    assert code == 2 and says in err and "\n" not in err, err
    assert out.out == ""  # nothing on stdout, not even the prompt


def test_missing_or_wrong_folders_fail_in_one_line(run, tmp_path, capsys):
    empty_run = tmp_path / "killed"
    empty_run.mkdir()
    (empty_run / "metrics.jsonl").write_text("")
    for path, says in [(tmp_path / "nothing", "does not exist"), (tmp_path, "neither a checkpoint folder"),
                       (empty_run, "has no checkpoint/ yet"), (run / "metrics.jsonl", "is a file")]:
        for command in ("generate", "eval", "analyze"):
            assert cli([command, str(path)]) == 2
            err = capsys.readouterr().err.strip()
            assert says in err and "RUN_OR_CHECKPOINT" in err and "\n" not in err, err


def test_checkpoint_from_before_special_tokens(tmp_path, capsys):
    """A bytes checkpoint saved before <|endoftext|> (256 ids, marker tokenizer file) still
    generates: no BOS in front, no EOS stop, and an empty prompt is refused."""
    from flash_depth.models import FlashDepthConfig, FlashDepthForCausalLM

    torch.manual_seed(0)
    config = FlashDepthConfig.from_preset("tiny", vocab_size=256, num_hidden_layers=1)
    FlashDepthForCausalLM(config).save_pretrained(tmp_path)
    (tmp_path / "tokenizer.json").write_text(json.dumps({"flash_depth_tokenizer": "bytes"}))
    tok = load_tokenizer(tmp_path / "tokenizer.json")
    assert tok.vocab_size == 256 and tok.eos_id is None and tok.special_ids() == {}
    assert cli(["generate", str(tmp_path), "--prompt", "ab", "--max-new-tokens", "5", "--device", "cpu"]) == 0
    assert "[5 tokens, --max-new-tokens reached" in capsys.readouterr().err
    assert cli(["generate", str(tmp_path), "--device", "cpu"]) == 2
    assert "prompt is empty" in capsys.readouterr().err


def test_import_flash_depth_is_enough_for_auto_classes(run):
    """In a fresh interpreter: AutoModelForCausalLM and AutoTokenizer load the run's checkpoint
    after `import flash_depth` alone, with BOS/EOS/PAD set on both."""
    code = f"""
import flash_depth, json, sys
from transformers import AutoModelForCausalLM, AutoTokenizer
ckpt = {str(run / "checkpoint")!r}
model, tok = AutoModelForCausalLM.from_pretrained(ckpt), AutoTokenizer.from_pretrained(ckpt)
print(json.dumps([type(model).__name__, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id,
                  model.config.bos_token_id, model.config.eos_token_id, model.config.pad_token_id,
                  tok("depth attention<|endoftext|>layer")["input_ids"]]))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    name, *special, ids = json.loads(proc.stdout.splitlines()[-1])
    eos = load_tokenizer(run / "checkpoint" / "tokenizer.json").eos_id
    assert name == "FlashDepthForCausalLM" and special == [eos] * 6
    assert ids == load_tokenizer(run / "checkpoint" / "tokenizer.json").encode(f"depth attention{EOT}layer")


@pytest.mark.parametrize("tokenizer", ["bytes", "bpe"])
def test_eos_separates_documents(tmp_path, tokenizer):
    docs = _docs(tmp_path / "docs", n=6, words=40)
    data = DataConfig(source=str(docs), tokenizer=tokenizer, vocab_size=300, val_fraction=0.34,
                      cache_dir=str(tmp_path / "cache"))
    splits = build_token_splits(data)
    tok = splits.tokenizer
    texts = [(docs / f"d{i}.txt").read_text() for i in range(6)]
    for stream, expected in ((splits.train, texts[:4]), (splits.val, texts[4:])):
        cuts = np.flatnonzero(stream == tok.eos_id)
        pieces = np.split(stream, cuts)
        assert len(cuts) == len(expected) - 1  # between documents, not around them
        assert [tok.decode(p) for p in pieces] == expected
    one = DataConfig(source=str(docs / "d0.txt"), tokenizer=tokenizer, vocab_size=300,
                     cache_dir=str(tmp_path / "cache"))
    single = build_token_splits(one)
    assert not (single.train == single.tokenizer.eos_id).any()  # one text, one document


def test_tokenizer_saved_before_special_tokens_keeps_its_stream(tmp_path):
    """Old checkpoints' tokenizers still join documents with a blank line, as they were trained."""
    docs = _docs(tmp_path / "docs", n=3, words=20)
    old = tmp_path / "tokenizer.json"
    old.write_text(json.dumps({"flash_depth_tokenizer": "bytes"}))
    data = DataConfig(source=str(docs), val_fraction=0.34, cache_dir=str(tmp_path / "cache"))
    splits = build_token_splits(data, tokenizer_path=old)
    texts = [(docs / f"d{i}.txt").read_text() for i in range(2)]
    assert splits.train.max() < 256 and splits.tokenizer.decode(splits.train) == "\n\n".join(texts)


def test_eval_analyze_compare_take_run_folders(run, tmp_path, capsys):
    """eval scores at the run's own seq_len and says so; analyze and compare write into the run."""
    capsys.readouterr()
    assert cli(["eval", str(run), "--device", "cpu", "--max-tokens", "2000"]) == 0
    out = capsys.readouterr()
    assert json.loads(out.out)["seq_len"] == 32 and "seq_len=32 (the run's train.seq_len)" in out.err
    assert cli(["eval", str(run / "checkpoint"), "--device", "cpu", "--seq-len", "16", "--max-tokens", "2000"]) == 0
    assert json.loads(capsys.readouterr().out)["seq_len"] == 16
    copy = tmp_path / "copy"  # written into: a copy keeps the shared run as it was
    shutil.copytree(run, copy)
    assert cli(["analyze", str(copy), "--batches", "1", "--seq-len", "16"]) == 0
    assert (copy / "analysis" / "report.md").exists()
    assert cli(["compare", str(copy), str(run)]) == 0
    assert (copy / "compare.png").exists() and (copy / "compare.md").exists()
    assert cli(["compare", str(copy), "--out", str(tmp_path / "cmp")]) == 0
    assert (tmp_path / "cmp" / "compare.png").exists()


def test_every_option_has_help_and_shows_its_default(capsys):
    import argparse

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, command in sub.choices.items():
        formatter = command._get_formatter()
        for action in command._actions:
            assert action.help, (name, action.dest)
            flag = isinstance(action, (argparse._StoreTrueAction, argparse._HelpAction))
            if action.option_strings and not flag and not action.required:
                assert "default" in formatter._get_help_string(action), (name, action.dest)
    with pytest.raises(SystemExit) as stop:
        cli(["--version"])
    from flash_depth import __version__

    assert stop.value.code == 0 and capsys.readouterr().out.strip() == f"flash-depth {__version__}"
