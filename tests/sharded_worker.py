"""PumaTrainer under accelerate's FSDP2 and DeepSpeed ZeRO-3 code paths, on CPU processes (gloo), as the sharded
tests run it.

accelerate selects FSDP and DeepSpeed only on accelerator devices (its `AcceleratorState` turns a plugin into the
FSDP or DeepSpeed type for GPU-like process groups only; a CPU process group stays plain data parallel). These tests
run on CPUs, so each process here (1) takes the environment `accelerate launch --config_file <the shipped YAML>`
would give it (accelerate's own launcher code builds it), (2) creates accelerate's shared state on the CPU with the
plugin that environment describes, and (3) sets that state's type to FSDP or DeepSpeed, the one step a GPU run takes
by itself. From there on, the Trainer, accelerate's `prepare` (`fully_shard`, or `deepspeed.initialize`), the
backward passes, the optimizer, checkpoints and the final save run their real code. Both train this way; DeepSpeed
runs on its CPU accelerator (DS_ACCELERATOR=cpu) over gloo, in float32 (the widest dtype it keeps weights in), and
peft's ZeRO-3 set-up of a trained token row is CUDA only, so on CPUs the LoRA students take theirs from the gathered
embedding (`sharded_scenarios.adapters_created`). On GPUs bench/device_zero3.sh `accelerate launch`es
tests/sharded_scenarios.py itself.

    python tests/sharded_worker.py fsdp|zero3 SCENARIOS.json RESULTS_FOLDER   # under torchrun / mp.spawn
    python tests/sharded_worker.py fsdp|zero3 train.py [OPTION ...]          # train.py (or a script running it)

train.py takes accelerate's state as configured here (`--accelerator_config '{"use_configured_state": true}'`,
transformers' documented way to bring one) on the CPU (`--use_cpu true --ddp_backend gloo`).
"""

import json
import os
import runpy
import sys


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.dirname(os.path.abspath(__file__))
CONFIGS = {"fsdp": os.path.join(ROOT, "configs", "accelerate", "fsdp.yaml"),
           "zero3": os.path.join(ROOT, "configs", "accelerate", "deepspeed_zero3.yaml")}


def launch_environment(kind: str, num_processes: int) -> dict[str, str]:
    """The variables `accelerate launch --config_file configs/accelerate/<kind>.yaml --num_processes N` sets for its
    processes (accelerate's own parsing and environment builders), mixed precision off (CPU float32)."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    args = launch_command_parser().parse_args(["--config_file", CONFIGS[kind], "--num_processes", str(num_processes),
                                               "--mixed_precision", "no", "train.py"])
    args, defaults, mixed_precision_from_config = _validate_launch_command(args)
    if kind == "zero3":  # what accelerate's launch_command sets before its DeepSpeed launcher
        fields = list(defaults.deepspeed_config) + (["mixed_precision"] if mixed_precision_from_config else [])
        args.deepspeed_fields_from_accelerate_config = ",".join(fields)
    environment = prepare_multi_gpu_env(args) if kind == "fsdp" else prepare_deepspeed_cmd_env(args)[1]
    return {key: value for key, value in environment.items() if key.startswith(("ACCELERATE_", "FSDP_"))}


def enter_sharded_state(kind: str) -> None:
    """accelerate's shared state on the CPU process group, of type FSDP or DeepSpeed with the plugin the launch
    environment describes (see the module docstring)."""
    from accelerate import Accelerator
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    if kind == "zero3":
        import deepspeed

        deepspeed.init_distributed(dist_backend="gloo")  # the process group accelerate's DeepSpeed branch creates
    # The Trainer's accelerator shares this one's state (accelerate keeps one per process, which copies the
    # process-level state's type on every construction: both are set).
    state = Accelerator(cpu=True).state  # the gloo process group; FSDP_* / ACCELERATE_DEEPSPEED_* plugins ignored
    sharded = DistributedType.FSDP if kind == "fsdp" else DistributedType.DEEPSPEED
    PartialState._shared_state["distributed_type"] = state.distributed_type = sharded
    if kind == "fsdp":
        from accelerate.utils import FullyShardedDataParallelPlugin

        state.fsdp_plugin = FullyShardedDataParallelPlugin()
    else:
        from accelerate.utils import DeepSpeedPlugin

        plugin = DeepSpeedPlugin()  # reads the ACCELERATE_DEEPSPEED_* variables
        plugin.set_mixed_precision("no")  # what accelerate's DeepSpeed branch does
        plugin.select(_from_accelerator_state=True)
        state.deepspeed_plugins = plugin
        # the Trainer's arguments would build a second plugin from the environment, which accelerate refuses once
        # its state holds one: they take it from the state (`Trainer.propagate_args_to_deepspeed`)
        del os.environ["ACCELERATE_USE_DEEPSPEED"]


def main(kind: str, *arguments: str) -> None:
    """Runs the scenarios (`SCENARIOS.json RESULTS_FOLDER`) or a script (`train.py OPTION ...`) in the state."""
    import torch

    sys.path[:0] = [ROOT, TESTS]
    os.environ.update(launch_environment(kind, int(os.environ["WORLD_SIZE"])))
    script = arguments[0].endswith(".py")
    if kind == "zero3" and not script:  # the scenarios train without clipping (max_grad_norm 0): DeepSpeed checks
        os.environ["ACCELERATE_GRADIENT_CLIPPING"] = "0.0"
    os.environ["ACCELERATE_USE_CPU"] = "true"
    torch.set_num_threads(1)
    enter_sharded_state(kind)
    if script:  # as `accelerate launch ... train.py OPTION ...` runs it
        sys.argv = list(arguments)
        runpy.run_path(arguments[0], run_name="__main__")
        return
    from sharded_scenarios import run_scenarios

    scenarios_file, out = arguments
    with open(scenarios_file, encoding="utf-8") as f:
        run_scenarios(json.load(f), out, sharding=kind)


if __name__ == "__main__":
    main(*sys.argv[1:])
