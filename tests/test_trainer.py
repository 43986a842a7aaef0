"""PumaTrainer: objective wiring, the three teachers, GradCache, logging, saving, start-up checks."""

import json
import math

import pytest
import torch
from torch.utils.data import Dataset

from data_puma import modality_id
from modeling_puma import PumaForEmbedding, build_prompt, featurize, parse_input
from trainer_puma import (
    CachedTeacher,
    PumaTrainer,
    PumaTrainingArguments,
    SeparateTeacher,
    SharedWeightTeacher,
    parameter_groups,
    precompute_teacher_cache,
    split_features,
    teacher_fingerprint,
)


peft = pytest.importorskip("peft", reason="the trainer tests train LoRA adapters with peft")


class PairDataset(Dataset):
    """Query/positive pairs over a few captions and coloured images, mixing target modalities."""

    def __init__(self, images, size=12):
        captions = ["a red circle", "a green square", "a blue star", "two yellow dots", "an orange ring",
                    "a purple cross", "a grey triangle", "a pink heart"]
        self.items = []
        for i in range(size):
            caption, image = captions[i % len(captions)], images[i % len(images)]
            if i % 3 == 0:
                query, positive, modality = {"text": caption}, {"image": image}, "image"
            elif i % 3 == 1:
                query, positive, modality = {"image": image}, {"text": caption}, "text"
            else:
                query, positive, modality = {"text": caption + " again"}, {"text": caption, "image": image}, "image,text"
            self.items.append({"query": query, "positive": positive, "modality": modality, "query_id": f"q{i}",
                               "positive_id": f"c{i}"})

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index):
        return self.items[index]


class Collator:
    """The batch format of data_puma.PumaCollator, built from the model's own prompt functions."""

    def __init__(self, processor, config):
        self.processor, self.config = processor, config

    def _features(self, items, instruction=None):
        examples = [parse_input(item, i) for i, item in enumerate(items)]
        prompts = [build_prompt(self.config, text, image is not None, instruction, self.processor.tokenizer)
                   for text, image in examples]
        return featurize(self.processor, self.config, prompts, [image for _, image in examples])

    def __call__(self, examples):
        return {
            "query": self._features([e["query"] for e in examples], "Find the match."),
            "candidate": self._features([e["positive"] for e in examples]),
            "modality": torch.tensor([modality_id(e["modality"]) for e in examples]),
            "query_ids": [e["query_id"] for e in examples],
            "candidate_ids": [e["positive_id"] for e in examples],
        }


def lora_student(checkpoint, num_layers=3, dropout=0.0, dtype=torch.float32):
    model = PumaForEmbedding.from_pretrained(checkpoint, num_layers=num_layers, dtype=dtype)
    config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=r".*language_model\.layers\.\d+\.(self_attn|mlp)\.\w+_proj",
                             trainable_token_indices={"embed_tokens": [model.config.embedding_token_id]})
    return peft.get_peft_model(model, config)


def training_args(tmp_path, **overrides):
    defaults = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=6, num_train_epochs=2,
                    learning_rate=5e-3, logging_steps=1, save_strategy="no", report_to=[], use_cpu=True,
                    dataloader_num_workers=0, seed=0, disable_tqdm=True)
    defaults.update(overrides)
    return PumaTrainingArguments(**defaults)


def one_batch(dataset, collator, size=6):
    return collator([dataset[i] for i in range(size)])


def test_training_lowers_the_mac_loss_and_logs_every_component(tiny_checkpoint, images, tmp_path):
    student = lora_student(tiny_checkpoint)
    base = student.get_base_model()
    dataset = PairDataset(images)
    collator = Collator(base.processor, base.config)
    args = training_args(tmp_path, num_train_epochs=6, loss="mac", tau_norm=0.05)
    trainer = PumaTrainer(model=student, args=args, train_dataset=dataset, data_collator=collator)
    batch = trainer._prepare_inputs(one_batch(dataset, collator, 12))
    with torch.no_grad():
        before = trainer.compute_loss(student, batch).item()
    trainer.train()
    with torch.no_grad():
        after = trainer.compute_loss(student, batch).item()
    assert after < before * 0.8, (before, after)
    logs = [entry for entry in trainer.state.log_history if "contrastive_loss" in entry]
    for key in ("contrastive_loss", "pos_sim", "intra_neg_sim", "inter_neg_sim", "accuracy", "tau_hard", "tau_norm"):
        assert key in logs[-1], key
    # tau_hard follows round(0.05 * exp(-0.5 * min(0.5, e/E) * 2), 3) as the epoch advances
    assert logs[0]["tau_hard"] == pytest.approx(0.05, abs=1e-3)
    assert logs[-1]["tau_hard"] == round(0.05 * math.exp(-0.5), 3)


def test_the_three_teachers_give_the_same_distillation_loss(tiny_checkpoint, images, tmp_path):
    student = lora_student(tiny_checkpoint)
    base = student.get_base_model()
    dataset = PairDataset(images)
    collator = Collator(base.processor, base.config)
    batch = one_batch(dataset, collator)

    shared = SharedWeightTeacher.from_student(student, tiny_checkpoint)
    separate = SeparateTeacher(PumaForEmbedding.from_pretrained(tiny_checkpoint))
    # the LoRA adapters start at zero; perturb them so a teacher that forgot to disable them would differ
    with torch.no_grad():
        for name, parameter in student.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.5)
    fingerprint = {"teacher": "tiny", "note": "test"}
    loader = torch.utils.data.DataLoader(dataset, batch_size=6, collate_fn=collator)
    assert precompute_teacher_cache(separate.model, loader, str(tmp_path / "cache"), fingerprint, shard_size=5) == 24
    cached = CachedTeacher(str(tmp_path / "cache"), fingerprint)

    args = training_args(tmp_path, loss="infonce", distill="mse", distill_weight=0.1, contrastive_weight=0.9,
                         kl_weight=0.5, teacher="cached", teacher_cache=str(tmp_path / "cache"))
    losses = {}
    for name, teacher in (("shared", shared), ("separate", separate), ("cached", cached)):
        trainer = PumaTrainer(model=student, args=args, train_dataset=dataset, data_collator=collator, teacher=teacher)
        with torch.no_grad():
            _, outputs = trainer.compute_loss(student, batch, return_outputs=True)
        losses[name] = (outputs["distill_loss"].item(), outputs["kl_loss"].item())
    assert losses["shared"] == pytest.approx(losses["separate"], abs=1e-5)
    assert losses["cached"] == pytest.approx(losses["separate"], abs=1e-5)
    assert losses["separate"][0] > 1e-4  # the student really differs from its teacher
    # the shared teacher holds only the dropped layers beyond the student's modules
    student_ids = {id(p) for p in student.parameters()}
    extra = [p for p in shared.model.parameters() if id(p) not in student_ids]
    dropped_layer = shared.model.model.language_model.layers[5]
    assert sum(p.numel() for p in extra) == 3 * sum(p.numel() for p in dropped_layer.parameters())


def test_a_stale_or_incomplete_cache_is_a_clear_error(tiny_checkpoint, images, tmp_path):
    model = PumaForEmbedding.from_pretrained(tiny_checkpoint)
    dataset = PairDataset(images, size=6)
    loader = torch.utils.data.DataLoader(dataset, batch_size=3, collate_fn=Collator(model.processor, model.config))
    data_file = tmp_path / "data.csv"
    data_file.write_text("a,b\n")
    fingerprint = teacher_fingerprint(tiny_checkpoint, model.config, [str(data_file)])
    precompute_teacher_cache(model, loader, str(tmp_path / "cache"), fingerprint)
    model.config.max_pixels = 8 * 28 * 28
    with pytest.raises(ValueError, match=r"stale \(pixel_limits: cache .*'max_pixels': 235200.* != run .*'max_pixels': 6272"):
        CachedTeacher(str(tmp_path / "cache"), teacher_fingerprint(tiny_checkpoint, model.config, [str(data_file)]))
    cache = CachedTeacher(str(tmp_path / "cache"), fingerprint)
    with pytest.raises(KeyError, match=r"lacks 1 ids of this batch, e.g. \['q99'\]"):
        cache.embed({"input_ids": torch.zeros(2, 3)}, ["q0", "q99"])


def test_a_retrained_teacher_of_the_same_file_sizes_makes_the_cache_stale(tiny_checkpoint, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    teacher = tmp_path / "teacher"
    shutil.copytree(tiny_checkpoint, teacher)
    config = PumaForEmbedding.from_pretrained(tiny_checkpoint).config
    before = teacher_fingerprint(str(teacher), config, [])
    weights = load_file(str(teacher / "model.safetensors"))
    weights = {key: value + 1e-3 if key.endswith("norm.weight") else value for key, value in weights.items()}
    size = (teacher / "model.safetensors").stat().st_size
    save_file(weights, str(teacher / "model.safetensors"), metadata={"format": "pt"})
    assert (teacher / "model.safetensors").stat().st_size == size  # same shapes, same size: only content differs
    after = teacher_fingerprint(str(teacher), config, [])
    assert after["teacher_checkpoint"]["model.safetensors"] != before["teacher_checkpoint"]["model.safetensors"]
    assert after["teacher_checkpoint"]["config.json"] == before["teacher_checkpoint"]["config.json"]


@pytest.mark.parametrize("objective", [
    dict(loss="mac", tau_norm=0.05),
    dict(loss="infonce", distill="mse", distill_weight=0.1, contrastive_weight=0.9, kl_weight=0.3, teacher="cached"),
])
def test_grad_cache_gradients_equal_the_plain_step(tiny_checkpoint, images, tmp_path, objective):
    # Without dropout the cached step must equal the plain one; the replay under dropout is tested below. float64
    # keeps summation-order rounding far below the tolerance (1/tau scales the gradients to ~10).
    student = lora_student(tiny_checkpoint, dtype=torch.float64)
    base = student.get_base_model()
    with torch.no_grad():
        for name, parameter in student.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.1)
    dataset = PairDataset(images)
    collator = Collator(base.processor, base.config)
    batch = one_batch(dataset, collator)
    teacher = None
    if objective.get("teacher") == "cached":
        loader = torch.utils.data.DataLoader(dataset, batch_size=6, collate_fn=collator)
        precompute_teacher_cache(PumaForEmbedding.from_pretrained(tiny_checkpoint, dtype=torch.float64), loader,
                                 str(tmp_path / "cache"), {})
        objective = dict(objective, teacher_cache=str(tmp_path / "cache"))
        teacher = CachedTeacher(str(tmp_path / "cache"))

    gradients = {}
    for chunk in (None, 2):
        args = training_args(tmp_path, grad_cache_chunk_size=chunk, **objective)
        trainer = PumaTrainer(model=student, args=args, train_dataset=dataset, data_collator=collator, teacher=teacher)
        trainer.current_gradient_accumulation_steps = 1  # set by the training loop, which this test bypasses
        student.zero_grad()
        torch.manual_seed(1234)
        loss = trainer.training_step(student, dict(batch))
        gradients[chunk] = (loss.item(), {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None})
    (plain_loss, plain), (cached_loss, cached) = gradients[None], gradients[2]
    assert cached_loss == pytest.approx(plain_loss, abs=1e-5)
    assert plain.keys() == cached.keys() and len(plain) > 0
    for name in plain:
        assert (plain[name] - cached[name]).abs().max() <= 1e-5, name


def test_rand_context_replays_dropout_masks(tiny_checkpoint, images):
    from trainer_puma import RandContext

    student = lora_student(tiny_checkpoint, dropout=0.5).train()
    base = student.get_base_model()
    with torch.no_grad():
        for name, parameter in student.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.5)
    features = Collator(base.processor, base.config)._features(["a red circle", {"text": "a dot", "image": images[0]}])
    state = RandContext(*features.values())
    first = student(**features).raw_embeddings
    unreplayed = student(**features).raw_embeddings
    with state:
        replayed = student(**features).raw_embeddings
    assert (first - unreplayed).abs().max() > 1e-4  # dropout is active
    assert torch.equal(first, replayed)


def test_split_features_keeps_each_rows_image(tiny_checkpoint, images):
    model = PumaForEmbedding.from_pretrained(tiny_checkpoint, num_layers=2)
    collator = Collator(model.processor, model.config)
    features = collator._features([{"text": "a"}, {"image": images[0]}, {"text": "b", "image": images[1]}, {"image": images[2]}])
    with torch.no_grad():
        whole = model(**features).raw_embeddings
        parts = torch.cat([model(**chunk).raw_embeddings for chunk in split_features(features, 2, model.config.image_token_id)])
    assert (whole - parts).abs().max() <= 1e-5


def test_final_save_merges_lora_into_a_checkpoint_that_auto_model_loads(tiny_checkpoint, images, tmp_path):
    from transformers import AutoModel

    student = lora_student(tiny_checkpoint)
    base = student.get_base_model()
    dataset = PairDataset(images)
    args = training_args(tmp_path, num_train_epochs=1, loss="mac")
    trainer = PumaTrainer(model=student, args=args, train_dataset=dataset, data_collator=Collator(base.processor, base.config))
    trainer.train()
    inputs = ["a red circle", images[0], {"text": "a blue star", "image": images[1]}]
    expected = base.encode(inputs)
    trainer.save_model(str(tmp_path / "final"))
    saved = json.loads((tmp_path / "final" / "config.json").read_text())
    assert saved["model_type"] == "puma" and "auto_map" in saved
    reloaded = AutoModel.from_pretrained(str(tmp_path / "final"), trust_remote_code=True)
    assert not any("lora" in name for name in reloaded.state_dict())
    assert (reloaded.encode(inputs) - expected).abs().max() <= 1e-5
    # the embedding token's row was trained and saved
    fresh = PumaForEmbedding.from_pretrained(tiny_checkpoint, num_layers=3)
    token = fresh.config.embedding_token_id
    assert (reloaded.get_input_embeddings().weight[token] - fresh.get_input_embeddings().weight[token]).abs().max() > 1e-4


def test_non_finite_loss_stops_with_the_step_number(tiny_checkpoint, images, tmp_path):
    student = lora_student(tiny_checkpoint)
    base = student.get_base_model()
    dataset = PairDataset(images)
    collator = Collator(base.processor, base.config)
    trainer = PumaTrainer(model=student, args=training_args(tmp_path), train_dataset=dataset, data_collator=collator)
    with torch.no_grad():
        next(p for n, p in student.named_parameters() if "lora_B" in n).fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="at step 0"):
        trainer.compute_loss(student, one_batch(dataset, collator))


def test_inconsistent_settings_fail_at_start_up(tiny_checkpoint, images, tmp_path):
    with pytest.raises(ValueError, match="needs a teacher"):
        training_args(tmp_path, distill="mse", distill_weight=0.1)
    with pytest.raises(ValueError, match="loss='triplet'"):
        training_args(tmp_path, loss="triplet")
    with pytest.raises(ValueError, match="teacher_cache"):
        training_args(tmp_path, teacher="cached", distill="mse", distill_weight=0.1)
    student = lora_student(tiny_checkpoint)
    base = student.get_base_model()
    no_modality = [{"query": {"text": "a"}, "positive": {"text": "b"}}]
    with pytest.raises(ValueError, match="needs modality labels"):
        PumaTrainer(model=student, args=training_args(tmp_path, loss="mac"), train_dataset=no_modality,
                    data_collator=Collator(base.processor, base.config))
    with pytest.raises(ValueError, match="needs a LoRA"):
        SharedWeightTeacher.from_student(base, tiny_checkpoint)


def test_parameter_groups_give_the_embedding_row_its_own_rate(tiny_checkpoint):
    student = lora_student(tiny_checkpoint)
    decay = {n for n, p in student.named_parameters() if p.ndim > 1}
    groups = parameter_groups(student, 1e-4, 0.01, decay, [(r"embed_tokens", 5e-3)])
    rates = {(g["lr"], g["weight_decay"]): sum(p.numel() for p in g["params"]) for g in groups}
    hidden = student.get_base_model().config.text_config.hidden_size
    assert rates[(5e-3, 0.01)] == hidden  # the trainable-token delta of the one embedding row
    assert sum(rates.values()) == sum(p.numel() for p in student.parameters() if p.requires_grad)


def test_training_runs_with_gradient_checkpointing_accumulation_bf16_and_the_shared_teacher(tiny_checkpoint, images, tmp_path):
    student = lora_student(tiny_checkpoint)
    base = student.get_base_model()
    dataset = PairDataset(images)
    args = training_args(tmp_path, num_train_epochs=1, per_device_train_batch_size=3, gradient_accumulation_steps=2,
                         gradient_checkpointing=True, bf16=True, loss="infonce", distill="mse", distill_weight=0.1,
                         contrastive_weight=0.9, teacher="shared", teacher_model=tiny_checkpoint)
    trainer = PumaTrainer(model=student, args=args, train_dataset=dataset, data_collator=Collator(base.processor, base.config))
    assert isinstance(trainer.teacher, SharedWeightTeacher)
    result = trainer.train()
    assert trainer.state.global_step == 2 and math.isfinite(result.training_loss)
    assert all(math.isfinite(entry["distill_loss"]) for entry in trainer.state.log_history if "distill_loss" in entry)
