#!/usr/bin/env bash
# Reproduce the committed GPU results, one section at a time (each writes benchmarks/results/).
#
#   bash benchmarks/reproduce.sh tests      # GPU test suite (CPU tests too), log in results/logs/
#   bash benchmarks/reproduce.sh moda       # MoDA / FDA ops vs cuDNN, FA2, FlexAttention
#   bash benchmarks/reproduce.sh attnres    # AttnRes read vs Liger, flash-attn-res, FLA, torch.compile
#   bash benchmarks/reproduce.sh kernels    # depth backward, MUDD dense mix and mHC kernels: bytes and time vs copy
#   bash benchmarks/reproduce.sh model      # training tokens/s per depth mechanism, small-48 and 700m: eager, compiled, + CUDA graph
#   bash benchmarks/reproduce.sh varlen     # packed documents (cu_seqlens) vs dense MoDA at equal tokens
#   bash benchmarks/reproduce.sh generate   # prefill/decode tok/s per mechanism vs Olmo2 (static cache, compiled steps)
#   bash benchmarks/reproduce.sh vit        # vision encoder training images/s, DeiT-Tiny shapes, 12 and 48 layers
#   bash benchmarks/reproduce.sh multigpu   # 1 GPU vs 2-GPU DDP and FSDP2 (needs 2 GPUs and data/mixed)
#   bash benchmarks/reproduce.sh study      # the depth-mechanism study (needs data/mixed), docs/study.md
#
# The AttnRes peers are optional: pip install liger-kernel flash-attn-res fla-core (missing ones are skipped).
# data/mixed comes from: python scripts/build_corpus.py --out data/mixed
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src:$PWD/tests:$PWD/benchmarks${PYTHONPATH:+:$PYTHONPATH}"
logs=benchmarks/results/logs
mkdir -p "$logs"
gpu() { python -c "import torch; print(torch.cuda.get_device_name().split()[1].lower())"; }

case "${1:-}" in
  tests)    python -m pytest tests 2>&1 | tee "$logs/gpu_tests_$(gpu).log" ;;
  moda)     python benchmarks/bench_moda.py ;;
  attnres)  python benchmarks/bench_attnres.py --tune 2>&1 | tee "$logs/bench_attnres_$(gpu).log"
            python benchmarks/tune_attnres.py 2>&1 | tee "$logs/tune_attnres_d384_$(gpu).log" ;;
  kernels)  python benchmarks/bench_depth_backward.py --tiles 16x4x1 16x4x3 2>&1 \
              | tee "$logs/bench_depth_backward_$(gpu).log"  # unpipelined vs the default
            python benchmarks/bench_dense_mix.py 2>&1 | tee "$logs/bench_dense_mix_$(gpu).log"
            python benchmarks/tune_hyper.py 2>&1 | tee "$logs/tune_hyper_$(gpu).log" ;;
  model)    python benchmarks/bench_model.py --presets small-48 700m
            python benchmarks/bench_model.py --presets small-48 --compile
            python benchmarks/bench_model.py --presets small-48 --cuda-graph --variants residual "moda + FFN KV" post-norm \
              attnres
            python benchmarks/bench_model.py --presets small-48 700m --compile --cuda-graph \
              --variants residual "moda + FFN KV" post-norm "window 16" fp8 attnres mhc "hc (4" mudd ;;
  varlen)   python benchmarks/bench_varlen.py ;;
  generate) # one run per group: each compiles its models at both batch sizes (about a minute each)
            python benchmarks/bench_generate.py --quick
            python benchmarks/bench_generate.py --variants olmo2 residual "residual (dynamic)" "moda (attn KV)" \
              depth_attention
            python benchmarks/bench_generate.py --variants olmo2 residual attnres_full denseformer mhc hc
            python benchmarks/profile_generate.py --variants olmo2 residual "moda + FFN KV" 2>&1 \
              | tee "$logs/profile_generate_b1_$(gpu).log" ;;
  vit)      python benchmarks/bench_vit.py ;;
  multigpu)
    common="data.source=data/mixed/shards model.preset=small-24 model.depth_mechanism=moda train.seq_len=1024
            train.batch_size=16 train.max_steps=80 train.warmup_steps=10 train.eval_every=40 train.eval_batches=4
            train.checkpoint_every=80 train.log_every=10"
    export NCCL_NVLS_ENABLE=0
    # shellcheck disable=SC2086
    python -m flash_depth.train --out runs/multigpu/gpu1 $common
    # shellcheck disable=SC2086
    torchrun --standalone --nproc_per_node=2 -m flash_depth.train --out runs/multigpu/ddp2 $common train.distributed=ddp
    # shellcheck disable=SC2086
    torchrun --standalone --nproc_per_node=2 -m flash_depth.train --out runs/multigpu/fsdp2 $common train.distributed=fsdp
    cat runs/multigpu/*/summary.json ;;
  study)    python scripts/study.py --out runs/study ;;
  *)        sed -n 2,15p "$0"; exit 2 ;;
esac
