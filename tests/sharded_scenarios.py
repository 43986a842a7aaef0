"""Training scenarios run alike on one process and on two sharded processes (tests/test_sharded.py): each trains a
tiny student for a few optimizer steps and writes what the comparison needs (each step's logged loss, the full
weights after training, the final saved folder)."""

import contextlib
import json
import os

import torch
from torch.utils.data import Dataset
from transformers import TrainerCallback


CAPTIONS = ["a red circle", "a green square", "a blue star", "two yellow dots", "an orange ring", "a purple cross",
            "a grey triangle", "a pink heart"]


class Pairs(Dataset):
    """Query/positive pairs mixing text and images and the three target modalities, with an instruction."""

    def __init__(self, size: int = 16):
        from conftest import draw_images

        images = draw_images()
        self.items = []
        for i in range(size):
            caption, image = CAPTIONS[i % len(CAPTIONS)], images[i % len(images)]
            query, positive, modality = [({"text": caption}, {"image": image}, "image"),
                                         ({"image": image}, {"text": caption}, "text"),
                                         ({"text": caption + " again"}, {"text": caption, "image": image},
                                          "image,text")][i % 3]
            self.items.append({"query": query, "positive": positive, "modality": modality, "query_id": f"q{i}",
                               "positive_id": f"c{i}", "instruction": "Find the match.", "negatives": [],
                               "negative_ids": [], "negative_modalities": []})

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index):
        return self.items[index]


def student(checkpoint: str, lora: bool, sharding: str = "none"):
    from modeling_puma import PumaForEmbedding

    torch.manual_seed(0)
    model = PumaForEmbedding.from_pretrained(checkpoint, num_layers=3, dtype="auto")
    if not lora:
        return model
    import peft

    config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                             target_modules=r".*language_model\.layers\.\d+\.(self_attn|mlp)\.\w+_proj",
                             trainable_token_indices={"embed_tokens": [model.config.embedding_token_id]})
    with adapters_created(model, sharding):
        model = peft.get_peft_model(model, config)
    with torch.no_grad():  # LoRA B starts at zero; random B makes the adapters matter from the first step
        generator = torch.Generator().manual_seed(1)
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)
    return model


@contextlib.contextmanager
def adapters_created(model, sharding: str):
    """Within: peft adds the adapters. Under ZeRO-3, peft copies the trained embedding row out of the partitioned
    embedding into a CUDA tensor (peft's `TrainableTokensLayer._collect_token_weights`, CUDA only); on CPU processes
    the embedding is gathered whole and peft reads the row as without ZeRO-3: the same row on every process."""
    if sharding != "zero3" or torch.cuda.is_available():
        yield
        return
    import deepspeed
    from accelerate.state import AcceleratorState
    from trainer_puma import without_zero3

    embedding = model.get_input_embeddings().weight
    with deepspeed.zero.GatheredParameters([embedding]), without_zero3(AcceleratorState().deepspeed_plugin):
        yield


def run_scenarios(scenarios: list[dict], out: str, sharding: str = "none") -> None:
    """Runs each scenario (a dict: `name`, `checkpoint`, `lora`, `world_size`, `batch` (the global batch),
    `steps`, and optionally `teacher`, `cache`, `grad_cache`, `depths`, `resume_at`) and writes
    `out/<name>.pt` (`{"losses", "weights"}`) and the final save `out/<name>/`."""
    for scenario in scenarios:
        run_scenario(scenario, out, sharding)


def run_scenario(scenario: dict, out: str, sharding: str) -> None:
    from data_puma import PumaCollator
    from trainer_puma import CachedTeacher, PumaTrainer, PumaTrainingArguments

    # on a GPU machine (bench/device_zero3.sh) the run is `accelerate launch`ed there, one process per GPU
    device = torch.cuda.is_available()
    name, world = scenario["name"], scenario["world_size"] if sharding != "none" else 1
    world = int(os.environ.get("WORLD_SIZE", 1)) if device else world
    model = student(scenario["checkpoint"], scenario["lora"], sharding)
    base = model.get_base_model() if scenario["lora"] else model
    teacher_mode = scenario.get("teacher", "none")
    distil = teacher_mode != "none"
    settings = dict(
        per_device_train_batch_size=scenario["batch"] // world, max_steps=scenario["steps"], learning_rate=0.5,
        optim="sgd", lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=0.0, logging_steps=1,
        report_to=[], use_cpu=not device, dataloader_num_workers=0, seed=0, disable_tqdm=True, loss="mac",
        tau_norm=0.05,
        grad_cache_chunk_size=scenario.get("grad_cache"), depths=scenario.get("depths"),
        distill="mse" if distil else "none", distill_weight=0.5 if distil else 0.0, kl_weight=0.5 if distil else 0.0,
        teacher=teacher_mode, teacher_model=scenario["checkpoint"] if teacher_mode in ("shared", "separate") else None,
        teacher_cache=scenario.get("cache"), save_strategy="no",
        ddp_backend="gloo" if world > 1 and not device else None,
        # the sharded state tests/sharded_worker.py set up (transformers' documented way to bring one)
        accelerator_config={"use_configured_state": True} if sharding != "none" and not device else None)
    teacher = CachedTeacher(scenario["cache"]) if teacher_mode == "cached" else None
    output_dir = os.path.join(out, f"{name}-run")
    for stop, resume in _stages(scenario):
        # a stopped stage runs the whole schedule's settings (max_steps) but stops after `stop` steps, saving there
        extra = dict(save_strategy="steps", save_steps=stop) if resume is False else {}
        if sharding == "zero3":
            one_deepspeed_plugin()
        args = PumaTrainingArguments(output_dir=output_dir, **{**settings, **extra})
        trainer = PumaTrainer(model=model, args=args, train_dataset=Pairs(), teacher=teacher,
                              data_collator=PumaCollator(base.processor, base.config),
                              callbacks=[StopAt(stop)] if resume is False else None)
        trainer.train(resume_from_checkpoint=resume or None)
        if resume is False:  # the run stops here; the next stage is a new trainer resuming from the checkpoint
            model = student(scenario["checkpoint"], scenario["lora"], sharding)
            base = model.get_base_model() if scenario["lora"] else model
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]  # resumed: from the start
    # what this process holds of the parameters: a shard of each when they are sharded
    local = sum(_local_numel(parameter) for parameter in trainer.model_wrapped.parameters())

    weights = trainer.accelerator.get_state_dict(trainer.model_wrapped if sharding == "zero3" else trainer.model)
    trainer.save_model(os.path.join(out, name))
    if trainer.is_world_process_zero():
        weights = {key: value.detach().to("cpu", torch.float32).clone() for key, value in weights.items()}
        torch.save({"losses": losses, "weights": weights, "local_numel": local,
                    "numel": sum(value.numel() for value in weights.values())}, os.path.join(out, f"{name}.pt"))
    trainer.accelerator.wait_for_everyone()


def one_deepspeed_plugin() -> None:
    """Lets a later trainer of this process take the DeepSpeed plugin of accelerate's state, as the first one did:
    accelerate's first Accelerator marks DeepSpeed in the environment (ACCELERATE_USE_DEEPSPEED), from which new
    TrainingArguments build a plugin of their own, and accelerate refuses a second Accelerator with a plugin."""
    from accelerate.state import AcceleratorState

    if AcceleratorState._shared_state:
        os.environ.pop("ACCELERATE_USE_DEEPSPEED", None)


class StopAt(TrainerCallback):
    """Ends training after `step` optimizer steps (the checkpoint of that step written), as a killed run ends."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_training_stop = True


def _local_numel(parameter) -> int:
    """Elements of `parameter` this process holds: its local shard (FSDP2's DTensor, DeepSpeed's partition)."""
    if hasattr(parameter, "to_local"):
        return parameter.to_local().numel()
    if hasattr(parameter, "ds_tensor"):
        return parameter.ds_tensor.numel()
    return parameter.numel()


def _stages(scenario: dict):
    """`(steps to stop at, resume)`: one stage, or with `resume_at`, a run saving a checkpoint and stopping there,
    then one resuming from it."""
    if scenario.get("resume_at"):
        return [(scenario["resume_at"], False), (scenario["steps"], True)]
    return [(scenario["steps"], None)]


if __name__ == "__main__":  # SCENARIOS.json OUT [SHARDING]: as launched (bench/device_zero3.sh)
    import sys

    sys.path[:0] = [os.path.dirname(os.path.dirname(os.path.abspath(__file__))), os.path.dirname(__file__)]
    with open(sys.argv[1], encoding="utf-8") as f:
        run_scenarios(json.load(f), sys.argv[2], *sys.argv[3:])
