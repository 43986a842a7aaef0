"""The memory plan (`memory_plan_puma`, `train.py --plan`) against the models and measured steps: parameter counts
exact for every family, the activation bytes against the tensors autograd saves, and the whole plan against the
peak memory of a training step of a mid-size random checkpoint."""

import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, draw_images
from memory_plan_puma import (TrainingShape, format_plan, largest_batch, model_shape, parse_memory, plan,
                              plan_settings, read_config, vision_activation_bytes)


LORA_TARGETS = r".*language_model\.layers\.\d+\.(self_attn|mlp)\.(q|k|v|o|gate|up|down)_proj"


def lora_student(checkpoint: str, num_layers: int, rank: int = 4):
    import peft

    from modeling_puma import PumaForEmbedding

    base = PumaForEmbedding.from_pretrained(checkpoint, num_layers=num_layers, dtype=torch.float32)
    config = peft.LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=LORA_TARGETS,
                             trainable_token_indices={"embed_tokens": [base.config.embedding_token_id]})
    return base, peft.get_peft_model(base, config)


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe"])
def test_parameter_counts_equal_the_models_of_every_family(family_checkpoints, family):
    checkpoint = family_checkpoints[family]
    shape = model_shape(read_config(checkpoint))
    base, student = lora_student(checkpoint, num_layers=3)
    counted = plan(shape, TrainingShape(num_layers=3, dtype="float32", lora_rank=4)).details
    assert counted["parameters"] == sum(parameter.numel() for parameter in student.parameters())
    # the adapters, and the embedding token's trained row (peft keeps it beside the frozen table)
    assert counted["trainable"] == sum(parameter.numel() for parameter in student.parameters()
                                       if parameter.requires_grad)
    full = plan(shape, TrainingShape(num_layers=3, dtype="float32", lora_rank=None)).details
    own = sum(parameter.numel() for name, parameter in student.named_parameters()
              if "lora_" not in name and "trainable_tokens" not in name)  # the model without its adapters
    assert full["trainable"] == full["parameters"] == own


def _pairs(count: int) -> list[dict]:
    images = draw_images()
    return [{"query": {"text": f"a drawn shape number {i}", "image": images[i % 3].resize((112, 112))},
             "positive": {"text": f"a drawn shape number {i}", "image": images[i % 3].resize((112, 112))},
             "modality": "image,text", "query_id": f"q{i}", "positive_id": f"c{i}", "instruction": None,
             "negatives": [], "negative_ids": [], "negative_modalities": []} for i in range(count)]


def _saved_activation_bytes(model, features: dict, exclude: set[int]) -> int:
    """Bytes of the distinct storages autograd saves during a forward of `features`, parameters excluded."""
    saved = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in exclude:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(**features)
    return sum(saved.values())


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen3_vl"])
def test_activation_bytes_match_what_autograd_saves(family_checkpoints, family):
    from data_puma import PumaCollator

    checkpoint = family_checkpoints[family]
    shape = model_shape(read_config(checkpoint))
    base, student = lora_student(checkpoint, num_layers=3)
    features = PumaCollator(base.processor, base.config)(_pairs(4))["candidate"]
    rows, tokens = features["input_ids"].shape
    parameters = {parameter.untyped_storage().data_ptr() for parameter in student.parameters()}
    measured = _saved_activation_bytes(student, features, parameters)
    training = TrainingShape(num_layers=3, dtype="float32", lora_rank=4, batch=rows // 2, max_pixels=112 * 112)
    # the frozen vision tower saves nothing; the plan adds the working set of one of its blocks, which is transient
    estimated = plan(shape, training, tokens=tokens).activations - vision_activation_bytes(shape, training, rows)
    # The plan counts the decoder's saved tensors by width; what it leaves out (the norms' per-token scales, the
    # pooled row, the embedding rows) is a few per cent: 10% either way.
    assert 0.9 * measured <= estimated <= 1.1 * measured, (measured, estimated)


def test_a_larger_batch_needs_more_and_the_largest_batch_fits(tiny_checkpoint):
    shape = model_shape(read_config(tiny_checkpoint))
    training = TrainingShape(dtype="bfloat16", lora_rank=16, batch=8)
    memory = parse_memory("64MiB")
    best = largest_batch(shape, training, memory, processes=4, sharding="zero3")
    assert best > 0
    assert plan(shape, TrainingShape(**{**training.__dict__, "batch": best}), 4, "zero3").total <= memory
    assert plan(shape, TrainingShape(**{**training.__dict__, "batch": best + 1}), 4, "zero3").total > memory
    # sharding divides what is sharded: ZeRO-2 the gradients and optimizer state, ZeRO-3 the weights too
    ddp, zero2, zero3 = (plan(shape, TrainingShape(lora_rank=None, batch=8), 8, name)
                         for name in ("ddp", "zero2", "zero3"))
    assert zero2.parameters == ddp.parameters and zero2.optimizer * 8 >= ddp.optimizer > zero2.optimizer
    assert zero3.parameters < ddp.parameters and zero3.gradients == zero2.gradients
    # GradCache bounds the activations by its chunk, whatever the batch
    chunked = [plan(shape, TrainingShape(batch=batch, grad_cache=4)).activations for batch in (8, 64)]
    assert chunked[0] == chunked[1] < plan(shape, TrainingShape(batch=64)).activations


def test_the_teacher_costs_by_mode(tiny_checkpoint):
    shape = model_shape(read_config(tiny_checkpoint))  # 6 layers; the student keeps 3
    costs = {mode: plan(shape, TrainingShape(num_layers=3, teacher=mode)).teacher
             for mode in ("none", "cached", "shared", "separate")}
    layer = shape.layer_parameters(0) * 2  # bfloat16
    assert costs["none"] == costs["cached"] == 0
    assert costs["shared"] == 3 * layer  # the three layers the student lacks
    assert costs["separate"] > 6 * layer


@pytest.mark.parametrize("text, expected", [("80GiB", 80 * 1024**3), ("80GB", 80 * 1024**3), ("512MiB", 512 << 20),
                                            ("1.5G", int(1.5 * 1024**3))])
def test_memory_sizes_parse(text, expected):
    assert parse_memory(text) == expected


def test_a_bad_memory_size_is_named():
    with pytest.raises(ValueError, match="--plan-memory 'eighty'"):
        parse_memory("eighty")


def test_train_py_plan_prints_before_loading_weights(tiny_checkpoint, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(f"model_name_or_path: {tiny_checkpoint}\nnum_layers: 3\nuse_peft: true\nlora_r: 8\n"
                      "per_device_train_batch_size: 4\nteacher: shared\nteacher_model: " + tiny_checkpoint + "\n")
    # the weights are unreadable: the plan must not need them
    os.makedirs(tmp_path / "model", exist_ok=True)
    result = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "--config", str(config), "--plan",
                             "--plan-memory", "1GiB", "--plan-processes", "4"],
                            cwd=ROOT, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONPATH": ROOT, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Memory plan per process (4 processes" in result.stdout
    assert "ZeRO-3 / FSDP" in result.stdout and "largest batch in 1.00 GiB" in result.stdout
    assert "torch" not in result.stderr  # nothing loaded, nothing warned


def test_train_py_plan_of_a_hub_id_offline_is_one_line_naming_the_option_and_the_offline_flag(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("model_name_or_path: Qwen/Qwen2-VL-2B-Instruct\nnum_layers: 12\n")
    result = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "--config", str(config), "--plan"],
                            cwd=ROOT, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONPATH": ROOT, "HF_HUB_OFFLINE": "1",
                                 "HF_HOME": str(tmp_path / "hf")})
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "--model_name_or_path Qwen/Qwen2-VL-2B-Instruct" in result.stderr and "HF_HUB_OFFLINE" in result.stderr


def test_plan_settings_read_the_run(tiny_checkpoint):
    training = plan_settings({"use_peft": "true", "lora_r": "32", "bf16": True, "per_device_train_batch_size": 150,
                              "num_hard_negatives": 1, "grad_cache_chunk_size": 16, "kept_layers": "[0, 1, 5]"},
                             teacher_config=read_config(tiny_checkpoint))
    assert (training.lora_rank, training.dtype, training.rows, training.grad_cache) == (32, "bfloat16", 450, 16)
    assert training.kept_layers == [0, 1, 5] and training.teacher_depth == 6
    assert "largest batch" in format_plan(model_shape(read_config(tiny_checkpoint)), training, 8, 80 * 1024**3)


# ---- the plan against a measured step ------------------------------------------------------------------------------
def measure_step(checkpoint: str, layers: int, batch: int, out: str) -> None:
    """One full fine-tuning step (AdamW, float32) of `layers` layers over `batch` pairs; writes the process's peak
    resident memory during `train()` above its resident memory before it, and the batch's padded length."""
    from data_puma import PumaCollator
    from modeling_puma import PumaForEmbedding
    from trainer_puma import PumaTrainer, PumaTrainingArguments

    torch.manual_seed(0)
    model = PumaForEmbedding.from_pretrained(checkpoint, num_layers=layers, dtype=torch.float32)
    collator = PumaCollator(model.processor, model.config)
    pairs = _pairs(batch)
    tokens = max(features["input_ids"].shape[1] for key, features in collator(pairs).items()
                 if key in ("query", "candidate"))
    args = PumaTrainingArguments(output_dir=os.path.join(out, "run"), per_device_train_batch_size=batch, max_steps=1,
                                 learning_rate=1e-5, report_to=[], use_cpu=True, save_strategy="no", loss="infonce",
                                 disable_tqdm=True, dataloader_num_workers=0)
    trainer = PumaTrainer(model=model, args=args, train_dataset=pairs, data_collator=collator)
    before = _resident("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:  # resets the peak (VmHWM) to the current resident size
        f.write("5")
    trainer.train()
    with open(out + "/measured.json", "w") as f:
        json.dump({"peak_above_start": _resident("VmHWM") - before, "tokens": tokens}, f)


def _resident(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux's resettable peak memory")
def test_the_plan_bounds_the_measured_peak_of_a_mid_size_step(tmp_path):
    from tiny_puma import build_tiny_checkpoint  # noqa: F401  (the mid-size shape is written by its command)

    checkpoint = str(tmp_path / "small")
    subprocess.run([sys.executable, os.path.join(ROOT, "tiny_puma.py"), checkpoint, "--shape", "small"], check=True,
                   capture_output=True, cwd=ROOT)
    layers, batch = 4, 8
    code = (f"import sys; sys.path[:0] = [{ROOT!r}, {os.path.join(ROOT, 'tests')!r}]; import torch; "
            f"torch.set_num_threads(1); from test_memory_plan import measure_step; "
            f"measure_step({checkpoint!r}, {layers}, {batch}, {str(tmp_path)!r})")
    # large blocks from mmap, so that freed tensors leave the resident size at once (no allocator cache)
    environment = {**os.environ, "PYTHONPATH": ROOT, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
                   "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                            env=environment)
    assert result.returncode == 0, result.stderr[-3000:]
    measured = json.loads((tmp_path / "measured.json").read_text())
    shape = model_shape(read_config(checkpoint))
    training = TrainingShape(num_layers=layers, dtype="float32", lora_rank=None, batch=batch, max_pixels=112 * 112)
    planned = plan(shape, training, tokens=measured["tokens"])
    # What the step adds to the loaded model: gradients, AdamW's two moments and the activations. The plan sums them
    # as if all lived at once; in the step the activations are freed during the backward before the optimizer's
    # moments exist, so the measured peak is lower, but not below the larger of the two phases. Beyond the plan:
    # transient buffers (a layer's input gradients, the optimizer's temporaries) and heap overhead, 15%.
    added = planned.gradients + planned.optimizer + planned.activations
    lower = max(planned.gradients + planned.activations, planned.gradients + planned.optimizer)
    assert 0.85 * lower <= measured["peak_above_start"] <= 1.15 * added, (measured, planned)
