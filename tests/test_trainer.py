"""PumaTrainer: objective wiring, the three teachers, GradCache, logging, saving, start-up checks."""

import json
import math
import os

import pytest
import torch
from torch.utils.data import Dataset

from mbeir_puma import modality_id
from numerics import assert_close
from modeling_puma import PumaForEmbedding, build_prompt, featurize, parse_input, prepare_inputs
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
                               "positive_id": f"c{i}", "instruction": "Find the match."})

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
            "query": self._features([e["query"] for e in examples], examples[0]["instruction"]),
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


class RecordingTeacher:
    """A teacher that records how many rows each call embeds."""

    def __init__(self, teacher):
        self.teacher, self.rows = teacher, []

    def embed(self, features, ids):
        self.rows.append(features["input_ids"].shape[0])
        return self.teacher.embed(features, ids)


def perturb_lora(student, std):
    """LoRA B starts at zero (the adapters change nothing); random B makes them matter."""
    with torch.no_grad():
        for name, parameter in student.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, std)


def with_dropout(student, p=0.1):
    """Turns on attention dropout in every decoder layer (the LoRA dropout is set by `lora_student`)."""
    for module in student.modules():
        if hasattr(module, "attention_dropout"):
            module.attention_dropout = p
    return student


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
    batch = prepare_inputs(trainer, one_batch(dataset, collator, 12))
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
    perturb_lora(student, 0.5)
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
    # the same teacher embeddings by three float32 paths (shared weights with the adapters off, a separate model, a
    # cache written by the separate model): the same operations, whose grouping may differ (16 ulps of losses ~4)
    for name in ("shared", "cached"):
        assert_close(torch.tensor(losses[name], dtype=torch.float64),
                     torch.tensor(losses["separate"], dtype=torch.float64), dtype=torch.float32, ulps=16, name=name)
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


def test_a_matching_teacher_cache_is_reused_and_a_stale_one_is_not(tiny_checkpoint, images, tmp_path):
    from trainer_puma import teacher_cache_is_fresh

    model = PumaForEmbedding.from_pretrained(tiny_checkpoint, num_layers=1)
    loader = torch.utils.data.DataLoader(PairDataset(images, size=3), batch_size=3,
                                         collate_fn=Collator(model.processor, model.config))
    fingerprint = {"teacher": "a", "data": [1, 2]}
    assert not teacher_cache_is_fresh(str(tmp_path / "cache"), fingerprint)
    precompute_teacher_cache(model, loader, str(tmp_path / "cache"), fingerprint)
    assert teacher_cache_is_fresh(str(tmp_path / "cache"), {"data": [1, 2], "teacher": "a"})
    assert not teacher_cache_is_fresh(str(tmp_path / "cache"), {"teacher": "b", "data": [1, 2]})
    os.remove(tmp_path / "cache" / "manifest.json")
    assert not teacher_cache_is_fresh(str(tmp_path / "cache"), fingerprint)


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
    dict(loss="mac", tau_norm=0.05, depths=[1, 2, 3], matryoshka_dims=[16, 64], depth_weights=[0.5, 0.5, 1.0],
         distill="mse", distill_weight=0.1, kl_weight=0.3, teacher="cached", self_distill="cosine",
         self_distill_weight=0.2, self_kl_weight=0.3),
], ids=["mac", "infonce-distill", "elastic"])
def test_grad_cache_gradients_equal_the_plain_step(tiny_checkpoint, images, tmp_path, objective):
    # Without dropout the cached step must equal the plain one; the replay under dropout is tested below. In float64
    # the two differ by summation order only: a float32 step anywhere (e.g. a downcast in the replayed backward)
    # exceeds the float64 bound by orders of magnitude.
    student = lora_student(tiny_checkpoint, dtype=torch.float64)
    base = student.get_base_model()
    perturb_lora(student, 0.1)
    dataset = PairDataset(images)
    collator = Collator(base.processor, base.config)
    batch = one_batch(dataset, collator)
    teacher = None
    if objective.get("teacher") == "cached":
        loader = torch.utils.data.DataLoader(dataset, batch_size=6, collate_fn=collator)
        precompute_teacher_cache(PumaForEmbedding.from_pretrained(tiny_checkpoint, dtype=torch.float64), loader,
                                 str(tmp_path / "cache"), {})
        objective = dict(objective, teacher_cache=str(tmp_path / "cache"))
        teacher = RecordingTeacher(CachedTeacher(str(tmp_path / "cache")))

    gradients = {}
    for chunk in (None, 2):
        if teacher is not None:
            teacher.rows.clear()
        args = training_args(tmp_path, grad_cache_chunk_size=chunk, **objective)
        trainer = PumaTrainer(model=student, args=args, train_dataset=dataset, data_collator=collator, teacher=teacher)
        trainer.current_gradient_accumulation_steps = 1  # set by the training loop, which this test bypasses
        student.zero_grad()
        torch.manual_seed(1234)
        loss = trainer.training_step(student, dict(batch))
        gradients[chunk] = (loss.item(), {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None})
    if teacher is not None:  # GradCache runs the teacher one chunk at a time too
        assert teacher.rows and max(teacher.rows) == 2
    (plain_loss, plain), (cached_loss, cached) = gradients[None], gradients[2]
    assert_close(cached_loss, plain_loss, dtype=torch.float64, ulps=1000, name="loss")
    assert plain.keys() == cached.keys() and len(plain) > 0
    for name in plain:
        assert_close(cached[name], plain[name], ulps=1000, name=name)


def test_grad_cache_runs_a_frozen_vision_tower_once_and_a_trained_one_in_both_passes(tiny_checkpoint, images,
                                                                                      tmp_path):
    # Given a batch of 6 pairs in chunks of 2 (3 chunks per group, mixing text and images), in float64
    dataset = PairDataset(images)
    lora = lora_student(tiny_checkpoint, dtype=torch.float64)
    perturb_lora(lora, 0.1)
    full = PumaForEmbedding.from_pretrained(tiny_checkpoint, num_layers=3, dtype=torch.float64).train()
    for name, student in (("lora", lora), ("full", full)):
        base = student.get_base_model() if name == "lora" else student
        collator = Collator(base.processor, base.config)
        batch = one_batch(dataset, collator)
        towers = []
        hook = base.model.visual.register_forward_hook(lambda *a: towers.append(1))
        gradients = {}
        try:
            for chunk in (None, 2):
                args = training_args(tmp_path, grad_cache_chunk_size=chunk, loss="mac", tau_norm=0.05)
                trainer = PumaTrainer(model=student, args=args, train_dataset=dataset, data_collator=collator)
                trainer.current_gradient_accumulation_steps = 1
                student.zero_grad()
                towers.clear()
                trainer.training_step(student, dict(batch))
                gradients[chunk] = {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}
            with_images = ["pixel_values" in features for _, _, features in trainer._grad_cache_chunks(batch)]
        finally:
            hook.remove()
        # When the tower is frozen (LoRA) its outputs of the first pass serve the replays: one run per chunk holding
        # an image; when it trains, the replays run it again (but the kept last chunk, which is not replayed)
        assert sum(with_images) >= 3 and len(with_images) == 6
        expected = sum(with_images) if name == "lora" else 2 * sum(with_images) - with_images[-1]
        assert len(towers) == expected, name
        # and the gradients equal the plain step's (the tower's own too, when it trains)
        assert gradients[None].keys() == gradients[2].keys()
        assert name == "lora" or any(".visual." in key for key in gradients[2])
        for key in gradients[None]:
            assert_close(gradients[2][key], gradients[None][key], ulps=1000, name=f"{name} {key}")


def test_an_elastic_step_is_one_forward_and_equals_the_loss_of_the_separately_loaded_truncated_models(
        tiny_checkpoint, images, tmp_path):
    # Given a 3-layer student trained at depths 1, 2, 3 and sizes 16, 64 with the separate teacher and
    # self-distillation
    student = PumaForEmbedding.from_pretrained(tiny_checkpoint, num_layers=3)
    dataset = PairDataset(images)
    collator = Collator(student.processor, student.config)
    args = training_args(tmp_path, loss="mac", tau_norm=0.05, depths=[1, 2, 3], depth_weights=[0.2, 0.3, 1.0],
                         matryoshka_dims=[16, 64], distill="mse", distill_weight=0.1, kl_weight=0.2, teacher="separate",
                         teacher_model=tiny_checkpoint, self_distill="mse", self_distill_weight=0.05,
                         self_kl_weight=0.3)
    trainer = PumaTrainer(model=student, args=args, train_dataset=dataset, data_collator=collator)
    batch = one_batch(dataset, collator)
    forwards = []
    hook = student.model.language_model.register_forward_hook(lambda *a: forwards.append(1))
    # When one step's loss is computed
    try:
        with torch.no_grad():
            loss, outputs = trainer.compute_loss(student, batch, return_outputs=True)
    finally:
        hook.remove()
    # Then the student ran once per feature group, and the loss is the objective on the embeddings of models loaded
    # with 1, 2 and 3 layers and of the full-depth teacher
    assert len(forwards) == 2
    embeddings = {"query": {}, "candidate": {}}
    with torch.no_grad():
        for depth in (1, 2, 3):
            model = PumaForEmbedding.from_pretrained(tiny_checkpoint, num_layers=depth)
            for group in embeddings:
                embeddings[group][depth] = model(**batch[group]).raw_embeddings
        teacher = PumaForEmbedding.from_pretrained(tiny_checkpoint)
        expected = args.build_objective().compute_loss_from_embeddings(
            embeddings["query"], embeddings["candidate"], teacher(**batch["query"]).raw_embeddings,
            teacher(**batch["candidate"]).raw_embeddings, modality=batch["modality"])
    for key in ("loss", "contrastive_loss_d1_m16", "contrastive_loss_d2_m64", "distill_loss", "kl_loss",
                "self_distill_loss_d1", "self_kl_loss_d2_m16"):
        # one forward read at several depths vs models loaded at each depth: the same float32 operations, whose
        # grouping may differ (8 ulps of losses up to ~10)
        assert_close(outputs[key], expected[key], ulps=8, name=key)
    # and every pair's component is logged; the saved config records the depths and sizes
    logs = {"loss": loss.item()}
    trainer.log(logs)
    assert {f"contrastive_loss_d{d}_m{m}" for d in (1, 2, 3) for m in (16, 64)} <= set(logs)
    trainer.save_model(str(tmp_path / "saved"))
    saved = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert saved["trained_depths"] == [1, 2, 3] and saved["matryoshka_dims"] == [16, 64]


def test_elastic_settings_are_checked_naming_the_option(tiny_checkpoint, images, tmp_path):
    with pytest.raises(ValueError, match=r"elastic_pairs='random' is not one of \('grid', 'diagonal'\)"):
        training_args(tmp_path, depths=[1, 2], elastic_pairs="random")
    with pytest.raises(ValueError, match=r"depths must be strictly increasing, got \[2, 1\]"):
        training_args(tmp_path, depths=[2, 1])
    with pytest.raises(ValueError, match=r"matryoshka_dims must be one size per depth \(3\) with pairs='diagonal', got \[16, 32\]"):
        training_args(tmp_path, depths=[1, 2, 3], matryoshka_dims=[16, 32], elastic_pairs="diagonal")
    with pytest.raises(ValueError, match="self_distill_weight=0.1 needs self_distill='mse' or 'cosine'"):
        training_args(tmp_path, depths=[1, 2], self_distill_weight=0.1)
    with pytest.raises(ValueError, match="set depths"):
        training_args(tmp_path, self_kl_weight=0.1)
    with pytest.raises(ValueError, match=r"sample_pairs.*got 2"):
        training_args(tmp_path, depths=[1, 2], elastic_sample_pairs=2)
    sampled = training_args(tmp_path, depths=[1, 2, 3], elastic_sample_pairs=1, seed=5).build_objective()
    assert (sampled.sample_pairs, sampled.seed) == (1, 5)
    student = PumaForEmbedding.from_pretrained(tiny_checkpoint, num_layers=3)
    collator = Collator(student.processor, student.config)
    with pytest.raises(ValueError, match=r"depths must end at the model's kept depth 3 .*got \[1, 2\]"):
        PumaTrainer(model=student, args=training_args(tmp_path, depths=[1, 2]), train_dataset=PairDataset(images),
                    data_collator=collator)
    with pytest.raises(ValueError, match=r"matryoshka_dims \[128\] exceed the embedding size 64"):
        PumaTrainer(model=student, args=training_args(tmp_path, matryoshka_dims=[32, 128]),
                    train_dataset=PairDataset(images), data_collator=collator)
    # Matryoshka sizes alone train the kept depth
    trainer = PumaTrainer(model=student, args=training_args(tmp_path, matryoshka_dims=[32, 64]),
                          train_dataset=PairDataset(images), data_collator=collator)
    assert trainer.objective.depths == [3] and trainer.objective.matryoshka_dims == [32, 64]


def test_rand_context_replays_dropout_masks(tiny_checkpoint, images):
    from trainer_puma import RandContext

    student = lora_student(tiny_checkpoint, dropout=0.5).train()
    base = student.get_base_model()
    perturb_lora(student, 0.5)
    features = Collator(base.processor, base.config)._features(["a red circle", {"text": "a dot", "image": images[0]}])
    state = RandContext(*features.values())
    first = student(**features).raw_embeddings
    unreplayed = student(**features).raw_embeddings
    with state:
        replayed = student(**features).raw_embeddings
    assert (first - unreplayed).abs().max() > 1e-4  # dropout is active
    assert torch.equal(first, replayed)


def test_grad_cache_replays_every_chunks_dropout_masks(tiny_checkpoint, images, tmp_path):
    # Given a student with LoRA and attention dropout, and a hook recording every forward's final hidden states
    student = with_dropout(lora_student(tiny_checkpoint, dropout=0.1))
    base = student.get_base_model()
    perturb_lora(student, 0.5)
    dataset = PairDataset(images)
    collator = Collator(base.processor, base.config)
    trainer = PumaTrainer(model=student, args=training_args(tmp_path, grad_cache_chunk_size=2, loss="mac"),
                          train_dataset=dataset, data_collator=collator)
    trainer.current_gradient_accumulation_steps = 1
    forwards = []
    hook = base.model.language_model.norm.register_forward_hook(lambda module, args, out: forwards.append(out.detach()))
    try:
        # When one GradCache step embeds 3 chunks per group (the last with a graph, which it keeps), then replays the
        # other 5 with one
        trainer.training_step(student, one_batch(dataset, collator))
        student.train()
        features = collator([dataset[0], dataset[1]])["query"]
        dropped = [student(**features).raw_embeddings for _ in range(2)]
    finally:
        hook.remove()
    # Then dropout is active, the kept chunk is not embedded again, and every replayed chunk equals its first
    # forward bit for bit
    assert (dropped[0] - dropped[1]).abs().max() > 1e-4
    assert len(forwards) == 6 + 5 + 2
    cached, replayed = forwards[:5], forwards[6:11]
    assert all(torch.equal(a, b) for a, b in zip(cached, replayed)), \
        [float((a - b).abs().max()) for a, b in zip(cached, replayed)]


def _ddp_grad_cache_worker(rank, world_size, port, checkpoint, out_file):
    """One rank of a 2-process gloo run: one optimizer step of 2 accumulation steps with GradCache, counting the
    all-reduces (the last accumulation step's last chunk must be the only one that syncs)."""
    import os

    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
    from torch.nn.parallel import DistributedDataParallel

    from conftest import draw_images

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world_size))
    torch.set_num_threads(1)

    def counting_allreduce(syncs, bucket):
        syncs.append(bucket.index())
        return default_hooks.allreduce_hook(None, bucket)

    class CountingTrainer(PumaTrainer):
        syncs = None

        def training_step(self, model, inputs, num_items_in_batch=None):
            if self.syncs is None:
                assert isinstance(model, DistributedDataParallel)
                self.syncs = []
                model.register_comm_hook(self.syncs, counting_allreduce)
            return super().training_step(model, inputs, num_items_in_batch)

    torch.manual_seed(0)
    student = lora_student(checkpoint, dropout=0.1)
    base = student.get_base_model()
    args = PumaTrainingArguments(
        output_dir=os.path.join(os.path.dirname(out_file), "out"), per_device_train_batch_size=4,
        gradient_accumulation_steps=2, max_steps=1, learning_rate=1e-2, grad_cache_chunk_size=2, loss="mac",
        save_strategy="no", report_to=[], use_cpu=True, ddp_backend="gloo", dataloader_num_workers=0, seed=0,
        disable_tqdm=True)
    trainer = CountingTrainer(model=student, args=args, train_dataset=PairDataset(draw_images(), size=16),
                              data_collator=Collator(base.processor, base.config))
    trainer.train()
    weights = torch.cat([p.detach().flatten() for p in student.parameters() if p.requires_grad])
    gathered = [torch.empty_like(weights) for _ in range(world_size)]
    torch.distributed.all_gather(gathered, weights)
    results = {"syncs": list(trainer.syncs), "weights": gathered}
    if rank == 0:
        torch.save(results, out_file)
    torch.distributed.destroy_process_group()


def test_grad_cache_all_reduces_once_per_optimizer_step_under_ddp(tiny_checkpoint, tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # Given 2 gloo ranks, 2 accumulation steps of 4 pairs per rank in GradCache chunks of 2 (8 backward passes)
    mp.spawn(_ddp_grad_cache_worker, args=(2, port, tiny_checkpoint, str(tmp_path / "results.pt")), nprocs=2)
    result = torch.load(tmp_path / "results.pt")
    # Then each gradient bucket is all-reduced once in the optimizer step
    syncs = result["syncs"]
    assert syncs and all(syncs.count(bucket) == 1 for bucket in set(syncs)), syncs
    # and the ranks, having applied the same averaged gradient, hold the same weights
    first, second = result["weights"]
    assert torch.equal(first, second)


def test_evaluation_batches_stay_out_of_the_logged_training_components(tiny_checkpoint, images, tmp_path):
    student = lora_student(tiny_checkpoint)
    base = student.get_base_model()
    train, evaluation = PairDataset(images, size=6), PairDataset(images[::-1], size=6)
    collator = Collator(base.processor, base.config)
    args = training_args(tmp_path, loss="mac", per_device_eval_batch_size=6)
    trainer = PumaTrainer(model=student, args=args, train_dataset=train, eval_dataset=evaluation, data_collator=collator)
    # Given one training batch's components tracked for the next log
    with torch.no_grad():
        _, training = trainer.compute_loss(student, prepare_inputs(trainer, one_batch(train, collator)),
                                           return_outputs=True)
        _, expected_eval = trainer.compute_loss(student, prepare_inputs(trainer, one_batch(evaluation, collator)),
                                                return_outputs=True)
    trainer._tracked.clear()
    with torch.no_grad():
        trainer.compute_loss(student, prepare_inputs(trainer, one_batch(train, collator)))
    # When an evaluation runs before the next training log
    metrics = trainer.evaluate()
    logs = {"loss": 1.0}
    trainer.log(logs)
    # Then the evaluation reports its own components under eval_ names, and the training log holds the training
    # batch's alone
    # the same float32 batch computed again (the evaluation loop also averages it): a few roundings of losses ~5
    assert_close(metrics["eval_contrastive_loss"], expected_eval["contrastive_loss"], dtype=torch.float32, ulps=16,
                 name="eval loss")
    assert_close(metrics["eval_accuracy"], expected_eval["accuracy"], dtype=torch.float32, ulps=8, name="accuracy")
    assert_close(logs["contrastive_loss"], training["contrastive_loss"], dtype=torch.float32, ulps=16,
                 name="training loss")
    assert logs["contrastive_loss"] != pytest.approx(metrics["eval_contrastive_loss"], abs=1e-3)


def test_local_loss_and_gather_with_grad_reach_the_gathered_losses(tmp_path):
    args = training_args(tmp_path, loss="mac", local_loss=True, kl_weight=0.5, teacher="cached", teacher_cache="c")
    objective = args.build_objective()
    assert objective.contrastive.local_loss and objective.kl.local_loss
    assert not training_args(tmp_path, loss="infonce").build_objective().contrastive.local_loss
    with pytest.raises(ValueError, match="local_loss=True .* needs gather_across_devices=True and gather_with_grad"):
        training_args(tmp_path, local_loss=True, gather_across_devices=False)
    with pytest.raises(ValueError, match="local_loss=True .* needs gather_across_devices=True and gather_with_grad"):
        training_args(tmp_path, local_loss=True, gather_with_grad=False)
    plain = training_args(tmp_path, loss="mac", gather_with_grad=False, kl_weight=0.5, teacher="cached", teacher_cache="c")
    assert not plain.build_objective().contrastive.gather_with_grad and not plain.build_objective().kl.gather_with_grad


def test_tau_hard_reaches_its_plateau_in_a_run_set_by_max_steps(tiny_checkpoint, images, tmp_path):
    # Given a run whose length is 4 optimizer steps (num_train_epochs keeps its default of 3 and is ignored)
    student = lora_student(tiny_checkpoint)
    base = student.get_base_model()
    dataset = PairDataset(images, size=12)
    args = training_args(tmp_path, loss="mac", tau_norm=0.05, max_steps=4, per_device_train_batch_size=3,
                         num_train_epochs=3)
    trainer = PumaTrainer(model=student, args=args, train_dataset=dataset, data_collator=Collator(base.processor, base.config))
    trainer.train()
    # Then progress is global_step / max_steps: 0, 1/4, 2/4, 3/4, so the last two steps sit on the plateau
    taus = [entry["tau_hard"] for entry in trainer.state.log_history if "tau_hard" in entry]
    plateau = round(0.05 * math.exp(-0.5), 3)
    assert taus == [0.05, round(0.05 * math.exp(-0.25), 3), plateau, plateau]


def test_split_features_keeps_each_rows_image(tiny_checkpoint, images):
    model = PumaForEmbedding.from_pretrained(tiny_checkpoint, num_layers=2)
    collator = Collator(model.processor, model.config)
    features = collator._features([{"text": "a"}, {"image": images[0]}, {"text": "b", "image": images[1]}, {"image": images[2]}])
    with torch.no_grad():
        whole = model(**features).raw_embeddings
        parts = torch.cat([model(**chunk).raw_embeddings for chunk in split_features(features, 2, model.config.image_token_id)])
    # float32 forwards of one batch and of its halves (other padding, other kernel shapes), raw values up to ~4
    assert_close(whole, parts, ulps=16)


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
    # merged weights W + BA are rounded to float32 once: embeddings within float32 rounding of the adapter model's
    assert_close(reloaded.encode(inputs), expected, ulps=100)
    # the embedding token's row was trained and saved
    fresh = PumaForEmbedding.from_pretrained(tiny_checkpoint, num_layers=3)
    token = fresh.config.embedding_token_id
    assert (reloaded.get_input_embeddings().weight[token] - fresh.get_input_embeddings().weight[token]).abs().max() > 1e-4


def test_final_save_leaves_the_trainers_model_unchanged_and_training_goes_on(tiny_checkpoint, images, tmp_path):
    # Given a LoRA student after some training
    student = lora_student(tiny_checkpoint)
    base = student.get_base_model()
    dataset = PairDataset(images)
    collator = Collator(base.processor, base.config)
    trainer = PumaTrainer(model=student, args=training_args(tmp_path, max_steps=2, loss="mac"), train_dataset=dataset,
                          data_collator=collator)
    trainer.train()
    before = {name: value.clone() for name, value in student.state_dict().items()}
    # When the final, merged save is written
    trainer.save_model(str(tmp_path / "final"))
    # Then the trainer still holds the same adapter model, weights and adapters as they were
    assert trainer.model is student and os.path.isfile(tmp_path / "final" / "model.safetensors")
    after = student.state_dict()
    assert after.keys() == before.keys() and any("lora_A" in name for name in after)
    assert all(torch.equal(after[name], before[name]) for name in before)
    # and a further step still trains the adapters
    trainer.current_gradient_accumulation_steps = 1  # set by the training loop, which this step bypasses
    student.zero_grad()
    trainer.training_step(student, one_batch(dataset, collator))
    grads = [p.grad for name, p in student.named_parameters() if "lora_B" in name]
    assert grads and all(g is not None and g.abs().max() > 0 for g in grads)


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


def test_module_learning_rates_set_the_rate_of_matching_parameters_only(tiny_checkpoint, images, tmp_path):
    # Given the release's stage-1 rule as a JSON object on the command line: decoder layer 0 at half the rate
    student = lora_student(tiny_checkpoint)
    base = student.get_base_model()
    args = training_args(tmp_path, learning_rate=2e-4, module_learning_rates='{"language_model\\\\.layers\\\\.0\\\\.": 1e-4}')
    assert args.module_learning_rates == {r"language_model\.layers\.0\.": 1e-4}
    trainer = PumaTrainer(model=student, args=args, train_dataset=PairDataset(images),
                          data_collator=Collator(base.processor, base.config))
    # When the optimizer is built
    rates = {id(p): group["lr"] for group in trainer.create_optimizer().param_groups for p in group["params"]}
    # Then layer 0's LoRA matrices train at 1e-4 and every other trainable parameter at 2e-4
    trainable = {name: p for name, p in student.named_parameters() if p.requires_grad}
    slow = [name for name in trainable if ".layers.0." in name]
    assert len(slow) == 2 * 7  # lora_A and lora_B of q, k, v, o, gate, up, down
    assert all(rates[id(p)] == (1e-4 if name in slow else 2e-4) for name, p in trainable.items())


@pytest.mark.parametrize(("rules", "message"), [
    ('{"(": 1e-4}', "'\\(' is not a regular expression"),
    ({"layers": -1.0}, "rate of 'layers' must be a positive number, got -1.0"),
    ({"layers": "fast"}, "rate of 'layers' must be a positive number, got 'fast'"),
    ("[1e-4]", "must be a mapping of pattern -> rate, got list"),
    ("{layers: 1e-4}", "must be a JSON object"),
])
def test_module_learning_rates_are_validated_naming_the_bad_entry(tmp_path, rules, message):
    with pytest.raises(ValueError, match=message):
        training_args(tmp_path, module_learning_rates=rules)


def test_module_learning_rates_read_yaml_rates_and_refuse_a_rule_that_matches_nothing(tiny_checkpoint, tmp_path):
    assert training_args(tmp_path, module_learning_rates={"layers": "1e-4"}).module_learning_rates == {"layers": 1e-4}
    student = lora_student(tiny_checkpoint)
    with pytest.raises(ValueError, match=r"match no trainable parameter .*: visual\\.merger\. Trainable parameters are named like"):
        parameter_groups(student, 2e-4, 0.0, set(), [(r"layers\.0\.", 1e-4), (r"visual\.merger", 1e-5)])


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


def test_training_logs_readable_lines_and_keeps_transformers_progress_bar(tiny_checkpoint, images, tmp_path, capsys):
    from transformers import PrinterCallback, ProgressCallback

    from trainer_puma import ReadableLogCallback, ReadableProgressCallback

    student = lora_student(tiny_checkpoint)
    base = student.get_base_model()
    dataset = PairDataset(images)
    collator = Collator(base.processor, base.config)
    trainer = PumaTrainer(model=student, args=training_args(tmp_path, max_steps=2, loss="infonce"),
                          train_dataset=dataset, data_collator=collator)
    kinds = [type(callback) for callback in trainer.callback_handler.callbacks]
    assert ReadableLogCallback in kinds and PrinterCallback not in kinds  # disable_tqdm: lines only
    trainer.train()
    lines = capsys.readouterr().out.splitlines()
    logged = [line for line in lines if line.startswith("step ")]
    assert [line.split(" | ")[0] for line in logged] == ["step 1/2", "step 2/2"]
    # the total loss first, then its components, then the other scalars, as `name value` pairs
    fields = logged[0].split(" | ")
    assert fields[1].startswith("epoch ") and fields[2].startswith("loss ") and \
        fields[3].startswith("contrastive_loss ")
    entry = trainer.state.log_history[0]
    assert float(fields[2].split()[1]) == pytest.approx(entry["loss"], rel=1e-3)
    assert any(line.startswith("finished 2 steps in ") and "mean loss" in line for line in lines)

    with_bar = PumaTrainer(model=student, args=training_args(tmp_path, max_steps=2, disable_tqdm=False),
                           train_dataset=dataset, data_collator=collator)
    kinds = [type(callback) for callback in with_bar.callback_handler.callbacks]
    assert ReadableProgressCallback in kinds and ProgressCallback not in kinds
