"""lm-evaluation-harness adapter: ``HFLM`` over a flash-depth checkpoint, and local
multiple-choice tasks from a JSONL file (offline; no dataset download).

Task file: one JSON object per line, ``{"question": str, "choices": [str, ...], "answer": int}``.
"""

from __future__ import annotations

import json
from pathlib import Path


def hf_tokenizer(checkpoint: str | Path):
    """The checkpoint's tokenizer as a ``transformers`` fast tokenizer with an EOS."""
    from flash_depth.data.tokenizer import load_tokenizer

    tok = load_tokenizer(Path(checkpoint) / "tokenizer.json").to_hf()
    if tok.eos_token is None:
        # lm-eval needs an end-of-text id; checkpoints from before <|endoftext|> have none, and
        # the last vocabulary id stands in
        tok.eos_token = tok.convert_ids_to_tokens(tok.vocab_size - 1)
    return tok


def harness_model(checkpoint: str | Path, *, device: str = "auto", batch_size: int = 8):
    """An ``lm_eval`` ``HFLM`` wrapping the checkpoint's model and tokenizer. ``batch_size`` does not
    change a result: lm-eval pads loglikelihood batches on the right (no token sees a later one)
    and generate_until prompts on the left with an attention_mask, which the model masks."""
    from lm_eval.models.huggingface import HFLM

    from flash_depth.models import FlashDepthForCausalLM

    from flash_depth._device import resolve_device

    dev = resolve_device(device)
    model = FlashDepthForCausalLM.from_pretrained(checkpoint).to(dev).eval()
    return HFLM(pretrained=model, tokenizer=hf_tokenizer(checkpoint), batch_size=batch_size, device=str(dev),
                max_length=model.config.max_position_embeddings)


def write_multiple_choice_task(jsonl: str | Path, folder: str | Path, name: str | None = None) -> str:
    """Write an lm-eval task config for a local JSONL multiple-choice file; returns the task name."""
    jsonl = Path(jsonl).resolve()
    if not jsonl.exists():
        raise FileNotFoundError(f"task file {jsonl} does not exist")
    for lineno, line in enumerate(jsonl.read_text().splitlines(), 1):
        if not line.strip():
            continue
        record = json.loads(line)
        ok = (isinstance(record.get("question"), str) and isinstance(record.get("choices"), list)
              and isinstance(record.get("answer"), int) and 0 <= record["answer"] < len(record["choices"]))
        if not ok:
            raise ValueError(f"{jsonl}:{lineno} needs question (str), choices (list) and answer (index into choices)")
    name = name or f"flash_depth_{jsonl.stem}".replace("-", "_")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(jsonl)}},
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": "{{question}}",
        "doc_to_choice": "{{choices}}",
        "doc_to_target": "{{answer}}",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                        {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}],
    }
    (folder / f"{name}.yaml").write_text(json.dumps(config, indent=1))  # JSON is valid YAML
    return name


def run_multiple_choice(checkpoint: str | Path, jsonl: str | Path, *, work_dir: str | Path, device: str = "auto",
                        limit: int | None = None) -> dict:
    """Accuracy of the checkpoint on a local multiple-choice JSONL task: {"acc", "acc_norm", "n"}."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    name = write_multiple_choice_task(jsonl, work_dir)
    results = lm_eval.simple_evaluate(model=harness_model(checkpoint, device=device), tasks=[name],
                                      task_manager=TaskManager(include_path=str(work_dir)), limit=limit,
                                      bootstrap_iters=0, log_samples=False)
    metrics = results["results"][name]
    n = results.get("n-samples", {}).get(name, {}).get("effective")
    return {"task": name, "acc": metrics["acc,none"], "acc_norm": metrics["acc_norm,none"], "n": n}
