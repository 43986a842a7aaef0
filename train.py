# Copyright 2026 The PUMA contributors. Licensed under the Apache License, Version 2.0.
"""Train a PUMA embedding model: one YAML file per stage, every field overridable on the command line. The training
code is `train_puma` (installed as the `puma-train` command); this file runs it from a checkout.

    # stage 1: NLI text pairs, InfoNCE + distillation from the full-depth model (LoRA on the first 12 layers)
    accelerate launch --config_file configs/accelerate/ddp.yaml train.py --config configs/puma_stage1_nli.yaml
    # stage 2: M-BEIR with MAC-Loss, from stage 1's merged output
    accelerate launch --config_file configs/accelerate/ddp.yaml train.py --config configs/puma_stage2_mbeir.yaml
    # any field from the command line, e.g. a short run:
    python train.py --config configs/puma_stage2_mbeir.yaml --max_steps 10 --output_dir /tmp/try
    # elastic depth and Matryoshka sizes: one run trains the first 4, 8 and 12 layers, each at 512, 1024 and 1536
    # dimensions (every pair; --elastic_pairs diagonal: 4 at 512, 8 at 1024, 12 at 1536), from one forward per step
    python train.py --config configs/puma2b_stage2_mbeir.yaml --depths 4 8 12 --matryoshka_dims 512 1024 1536
    # fill the teacher cache for a dataset (teacher: cached), then train without running the teacher
    python train.py --config configs/puma_stage1_nli.yaml --teacher cached --teacher_cache cache/nli --precompute_teacher
    # push the final model as a complete Hub repository (card, handler, sentence-transformers files)
    python train.py --config configs/puma_stage2_mbeir.yaml --push_to_hub --hub_model_id you/puma-7b
    # PUMA's options (then the most used ones of transformers and trl); every option
    python train.py --help
    python train.py --help-all
"""

from train_puma import cli


if __name__ == "__main__":
    cli()
